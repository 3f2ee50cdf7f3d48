"""Prometheus metrics of the workers.

- The multiprocess bookkeeping (folding the files of exited pool processes, dropping the live
  gauges of killed ones, the newest quality value winning) in real forked processes.
- The queue-depth collector against a real Valkey: messages waiting (one in a priority
  sub-list), then one reserved by a real kombu consumer that has not acknowledged it, then a
  broker that is down; and the Redis keys it reads against those the installed kombu writes.
- End to end: a real Prometheus scrapes two real ``qpipe worker`` processes (a prefork cpu worker
  that replaces its pool process after every stage, and a solo-pool gpu worker) while a small
  pipeline runs twice, and its HTTP API is queried for the stage histogram, the cache, the
  images, the queues and the quality gauges.
- The shipped Prometheus config and alerting rules pass promtool, rule unit tests included.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SMALL_SPEC, wait_for
from tests.servers import free_port
from workers.metrics import METRIC_NAMES
from workers.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: multiprocess mode is chosen when prometheus_client is
    first imported, so each case needs a process of its own."""
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("QPIPE_METRICS_WORKER_DIR", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- multiprocess files

FOLDING = r"""
import json, multiprocessing as mp, os, signal, time
from pathlib import Path
from workers import metrics

stale = metrics.worker_dir("unit@test")
stale.mkdir(parents=True, exist_ok=True)
(stale / "counter_999999.db").write_bytes(b"left by an earlier worker")
path = str(metrics.enable_multiprocess("unit@test"))
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

def report(accuracy):
    # a pool process that runs a report, then exits cleanly (folding its own files, as the
    # worker_process_shutdown handler does)
    attempt = metrics.StageAttempt("report", cacheable=False)
    metrics.set_quality({"name": "digits", "baseline": {"name": "fp32", "accuracy_top1": accuracy,
                         "size_bytes": 1000, "latency_ms_p50": {"1": 2.0, "32": 40.0}},
                         "variants": [{"name": "ptq", "accuracy_top1": accuracy - 0.25, "accuracy_drop": 0.25,
                                       "size_bytes": 250, "latency_ms_p50": {"1": 0.5}},
                                      {"name": "qat", "accuracy_top1": None, "status": "FAILED"}]})
    attempt.end("done")
    with metrics.folder_lock(path):
        metrics.fold(path, os.getpid())

def killed():
    # a pool process SIGKILLed in the middle of a training epoch: no clean-up runs
    metrics.StageAttempt("finetune")
    metrics.images_hook("finetune")("train", 64, None)
    metrics.count_transfer("download", 4096)
    os.kill(os.getpid(), signal.SIGKILL)

def unfolded():
    # an exited process whose files nobody folded: what mark_process_dead alone keeps
    m = metrics.record._metrics()
    m.images_rate.labels("benchmark", "eval").set(123.0)
    m.in_progress.labels("benchmark").inc()

ctx = mp.get_context("fork")
pids = {}
for name, target, args in (("first", report, (0.5,)), ("killed", killed, ()), ("second", report, (0.75,)),
                           ("unfolded", unfolded, ())):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join()
    pids[name] = p.pid
    time.sleep(0.01)  # distinct timestamps for the mostrecent gauges
listing = sorted(os.listdir(path))
mark_process_dead(pids["unfolded"], path)
after_mark = sorted(os.listdir(path))
# the main process runs a stage too (the solo and threads pools)
metrics.StageAttempt("ingest").end("cached")
registry = CollectorRegistry()
registry.register(metrics.ProcessFilesCollector(path))
samples = []
for text in (generate_latest(registry).decode(), generate_latest(registry).decode()):
    samples.append([[s.name, s.labels, s.value] for fam in text_string_to_metric_families(text)
                    for s in fam.samples])
print(json.dumps({"pids": pids, "main": os.getpid(), "listing": listing, "after_mark": after_mark,
                  "final": sorted(os.listdir(path)), "samples": samples}))
"""


def _value(samples: list, name: str, **labels: str) -> float | None:
    for n, lab, value in samples:
        if n == name and all(lab.get(k) == v for k, v in labels.items()):
            return value
    return None


def test_multiprocess_files_of_exited_pool_processes_are_folded(tmp_path):
    proc = _python(FOLDING, {"QPIPE_METRICS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    pids, main = out["pids"], out["main"]
    assert "counter_999999.db" not in out["listing"], "the folder is wiped when the worker starts"
    # prometheus_client 0.26: mark_process_dead deletes only the live* gauges of a process; its
    # counters and mostrecent gauges stay (and would pile up, one set per recycled process)
    assert f"gauge_livesum_{pids['unfolded']}.db" in out["listing"]
    assert f"gauge_livesum_{pids['unfolded']}.db" not in out["after_mark"]
    assert f"gauge_mostrecent_{pids['unfolded']}.db" in out["after_mark"]
    # the folded processes left no files of their own; the killed one's went at the scrape
    for name in ("first", "second"):
        assert not [f for f in out["listing"] if f.endswith(f"_{pids[name]}.db")], out["listing"]
    assert [f for f in out["listing"] if f.endswith(f"_{pids['killed']}.db")], out["listing"]
    pid_files = [f for f in out["final"] if re.search(r"_\d+\.db$", f)]
    assert all(f.endswith(f"_{main}.db") for f in pid_files), out["final"]

    first, second = out["samples"]
    assert first == second, "scraping again must not change anything (nothing folded twice)"
    s = first
    assert _value(s, "qpipe_stage_duration_seconds_count", stage="report", outcome="done") == 2.0
    assert _value(s, "qpipe_stage_duration_seconds_bucket", stage="report", outcome="done", le="1.0") == 2.0
    assert _value(s, "qpipe_stage_duration_seconds_count", stage="ingest", outcome="cached") == 1.0
    assert _value(s, "qpipe_cache_hits_total", stage="ingest") == 1.0
    assert _value(s, "qpipe_cache_misses_total", stage="report") is None, "the report is never cached"
    # the killed process's counters survive it; what it had in progress does not
    assert _value(s, "qpipe_images_processed_total", stage="finetune", phase="train") == 64.0
    assert _value(s, "qpipe_artifact_downloaded_bytes_total") == 4096.0
    assert not _value(s, "qpipe_stages_in_progress", stage="finetune")  # gone with its process (or 0)
    assert not _value(s, "qpipe_stages_in_progress", stage="benchmark")
    assert _value(s, "qpipe_stages_in_progress", stage="ingest") == 0.0  # the live main process's
    assert _value(s, "qpipe_images_per_second", stage="benchmark", phase="eval") == 123.0
    # quality set in processes that have exited: the newest run wins
    assert _value(s, "qpipe_model_accuracy_top1", pipeline="digits", variant="fp32") == 0.75
    assert _value(s, "qpipe_model_accuracy_top1", pipeline="digits", variant="ptq") == 0.5
    assert _value(s, "qpipe_model_accuracy_drop", pipeline="digits", variant="fp32") == 0.0
    assert _value(s, "qpipe_model_accuracy_drop", pipeline="digits", variant="ptq") == 0.25
    assert _value(s, "qpipe_model_size_bytes", pipeline="digits", variant="ptq") == 250.0
    assert _value(s, "qpipe_model_latency_seconds", pipeline="digits", variant="fp32", batch_size="32") == 0.04
    assert _value(s, "qpipe_model_accuracy_top1", pipeline="digits", variant="qat") is None, "failed: no value"
    assert {n for n, _, _ in s if n.startswith("qpipe_")} <= {
        f"{base}{suffix}" for base in METRIC_NAMES for suffix in ("", "_bucket", "_count", "_sum")}


def test_enabling_after_prometheus_client_was_imported_is_refused(tmp_path):
    proc = _python("import prometheus_client\nfrom workers import metrics\nmetrics.enable_multiprocess('x@y')\n",
                   {"QPIPE_METRICS_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "imported before the worker enabled its multiprocess metrics" in proc.stderr


def test_recording_is_a_no_op_when_metrics_are_off(tmp_path):
    code = ("import sys\nfrom workers import metrics\n"
            "a = metrics.StageAttempt('ingest'); a.end('done'); metrics.count_transfer('upload', 10)\n"
            "assert metrics.images_hook('ingest') is None and metrics.set_quality({'name': 'x'}) == 0\n"
            "print('prometheus_client' in sys.modules)\n")
    proc = _python(code, {"QPIPE_METRICS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "nothing may import prometheus_client while metrics are off"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- queue depths

def test_queue_keys_are_those_the_kombu_in_use_writes():
    """The depth reads kombu's Redis layout: every list kombu can put a message of ``cpu`` in
    (one per priority 0-9), and no other, is one that :func:`queue_keys` counts."""
    from kombu.transport.redis import Channel

    from workers.metrics.queues import queue_keys

    channel = Channel.__new__(Channel)  # naming a key needs no connection
    written = {channel._q_for_pri("cpu", priority) for priority in range(10)}
    assert queue_keys("cpu")[0] == "cpu" and len(set(queue_keys("cpu"))) == len(queue_keys("cpu"))
    assert set(queue_keys("cpu")) == written
    assert Channel.unacked_key == "unacked", "the reserved count reads kombu's default unacked hash"


@pytest.mark.integration
def test_queue_depth_counts_waiting_and_reserved_messages_and_survives_a_down_broker(broker):
    from kombu import Consumer

    from workers.app import create_app
    from workers.metrics import WorkerCollector
    from workers.metrics.queues import queue_keys

    url = re.sub(r"/\d+$", "/3", broker.url)  # a database of its own: no other test's workers
    app = create_app(url)
    collector = WorkerCollector(url, node="n@h", queues=["cpu"], pool="prefork")

    def depths() -> dict:
        fams = {f.name: f for f in collector.collect()}
        assert [s.labels for s in fams["qpipe_worker_info"].samples] == [
            {"node": "n@h", "queues": "cpu", "pool": "prefork"}]
        return {(s.labels["queue"], s.labels["state"]): s.value for s in fams["qpipe_queue_messages"].samples}

    import redis

    redis.Redis.from_url(url).flushdb()
    assert depths() == {("cpu", "waiting"): 0, ("cpu", "reserved"): 0, ("gpu", "waiting"): 0, ("gpu", "reserved"): 0}
    for _ in range(2):
        app.send_task("qpipe.ingest", args=["run", {"id": "ingest", "stage": "ingest"}, "file:///nowhere"])
    app.send_task("qpipe.finetune", args=["run", {"id": "finetune", "stage": "finetune"}, "file:///nowhere"])
    # a message with a priority waits in one of kombu's priority sub-lists, and counts too
    app.send_task("qpipe.finetune", args=["run", {"id": "finetune", "stage": "finetune"}, "file:///nowhere"],
                  priority=5)
    assert redis.Redis.from_url(url).llen(queue_keys("gpu")[1]) == 1, "kombu put it in a sub-list"
    assert depths() == {("cpu", "waiting"): 2, ("cpu", "reserved"): 0, ("gpu", "waiting"): 2, ("gpu", "reserved"): 0}
    got = []
    with app.connection_for_read() as conn:
        consumer = Consumer(conn.default_channel, [app.amqp.queues["cpu"]], accept=["json"],
                            callbacks=[lambda body, message: got.append(message)])
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=10)
            assert len(got) == 1 and not got[0].acknowledged
            assert depths() == {("cpu", "waiting"): 1, ("cpu", "reserved"): 1,
                                ("gpu", "waiting"): 2, ("gpu", "reserved"): 0}
            got[0].ack()
    assert depths()[("cpu", "reserved")] == 0

    down = WorkerCollector(f"redis://127.0.0.1:{free_port()}/0", node="n@h", queues=["gpu"], pool="solo")
    t0 = time.monotonic()
    fams = {f.name: f for f in down.collect()}
    assert time.monotonic() - t0 < 5
    assert set(fams) == {"qpipe_worker_info"}, "a down broker leaves the queue samples out, nothing else"


# ----------------------------------------------------------------------------- promtool

def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="promtool not installed (Debian package prometheus)")
@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")], ids=" ".join)
def test_promtool(args):
    proc = _promtool(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_rules_and_scrape_config_name_what_the_workers_export():
    import yaml

    rules = (DEPLOY / "alerts.yml").read_text()
    used = set(re.findall(r"\bqpipe_[a-z0-9_]+", rules))
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    assert used and families <= set(METRIC_NAMES), families - set(METRIC_NAMES)
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"qpipe-worker", "flower"}
    sd = jobs["qpipe-worker"]["dns_sd_configs"][0]
    assert sd["type"] == "A" and sd["port"] == 9808
    assert {"worker-cpu", "worker-gpu"} <= set(sd["names"])
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


# ----------------------------------------------------------------------------- end to end

class PrometheusServer(ServerProcess):
    """Debian's Prometheus on 127.0.0.1, scraping ``targets`` every second."""

    name = "prometheus"

    def __init__(self, base_dir: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.port = free_port()
        self.targets = targets
        self.rule_files = rule_files
        super().__init__(base_dir, startup_timeout=60.0, stop_timeout=10.0, log_name="prometheus.log")

    def _prepare(self) -> None:
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(p) for p in self.rule_files],
                  "scrape_configs": [{"job_name": "qpipe-worker", "static_configs": [{"targets": self.targets}]}]}
        (self.base_dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML

    def _command(self) -> list[str]:
        return [PROMETHEUS, f"--config.file={self.base_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.base_dir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn"]

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> dict | list:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """{tuple of label values in key order: value} of an instant vector."""
        data = self.api("query", query=expr)
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}


def _by(result: dict[tuple, float], label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in result.items()}


METRICS_SPEC = {
    **copy.deepcopy(SMALL_SPEC),
    "name": "digits-metrics",
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
    # one epoch, so each split goes through the model once per stage (the image counts below)
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "quantize": {"backend": "x86", "variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"}]},
    # TorchScript only: each runtime's accuracy pass would count its own validation images
    "benchmark": {"batch_sizes": [1, 8], "threads": 1, "warmup": 1, "iterations": 3, "accuracy_budget": 0.2,
                  "runtimes": ["torchscript"]},
}


@pytest.mark.integration
@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="prometheus not installed (Debian package prometheus)")
def test_prometheus_scrapes_workers_during_a_pipeline(s3_env, tmp_path, monkeypatch):
    from tests.servers import Cluster

    store = f"s3://qpipe/metrics-{int(time.time() * 1000)}"  # nothing cached from other runs
    monkeypatch.setenv("QPIPE_METRICS_DIR", str(tmp_path / "metrics"))
    ports = {"cpu": free_port(), "gpu": free_port()}
    prom = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{p}" for p in ports.values()],
                            [DEPLOY / "alerts.yml"])
    # a broker of its own: no other test's workers or queues
    with Cluster(tmp_path, store) as cluster, prom:
        # cpu: the solo pool, stages in the main process; gpu: the default prefork pool, a new pool
        # process for every stage (whose files are folded when it exits)
        workers = [cluster.worker("cpu", logs=tmp_path / "logs", metrics_port=ports["cpu"],
                                  extra_args=("--pool", "solo")),
                   cluster.worker("gpu", logs=tmp_path / "logs", metrics_port=ports["gpu"])]
        folders = [tmp_path / "metrics" / re.sub(r"[^A-Za-z0-9@._-]", "_", w.node) for w in workers]
        client = cluster.client()
        first = client.submit(copy.deepcopy(METRICS_SPEC)).wait(timeout=600)
        assert first["status"] == "SUCCESS", first
        second = client.submit(copy.deepcopy(METRICS_SPEC)).wait(timeout=300)
        assert second["status"] == "SUCCESS" and second["cached_stages"] == 6, second

        # the scrape after the second report has landed once the quality gauges carry its values
        fp32 = second["baseline"]
        wait_for(lambda: prom.query('qpipe_model_accuracy_top1{pipeline="digits-metrics",variant="fp32"}'),
                 timeout=30)
        up = prom.query('up{job="qpipe-worker"}')
        assert sorted(up.values()) == [1.0, 1.0], json.dumps(prom.api("targets"))[:2000]
        info = prom.query("qpipe_worker_info")
        assert {dict(k)["node"]: dict(k)["pool"] for k in info} == {
            workers[0].node: "solo", workers[1].node: "prefork"}

        def counts(outcome: str) -> dict[str, float]:
            return _by(prom.query(f'sum by (stage) (qpipe_stage_duration_seconds_count{{outcome="{outcome}"}})'),
                       "stage")

        # every stage computed once in the first run (two benchmarks: fp32 and ptq-minmax), reused
        # in the second; the report runs every time
        want_done = {"ingest": 1, "finetune": 1, "calibrate": 1, "quantize": 1, "benchmark": 2, "report": 2}
        want_cached = {"ingest": 1, "finetune": 1, "calibrate": 1, "quantize": 1, "benchmark": 2}
        assert wait_for(lambda: counts("done") == want_done and counts("cached") == want_cached, timeout=15)
        assert _by(prom.query("sum by (stage) (qpipe_cache_hits_total)"), "stage") == want_cached
        assert _by(prom.query("sum by (stage) (qpipe_cache_misses_total)"), "stage") == {
            k: v for k, v in want_done.items() if k != "report"}
        assert not prom.query("qpipe_stage_failures_total") and not prom.query("qpipe_stage_retries_total")
        # durations are real: finetune took at least as long as its recorded training epoch
        finetune_s = prom.query('sum(qpipe_stage_duration_seconds_sum{stage="finetune",outcome="done"})')
        assert list(finetune_s.values())[0] > 0.5
        assert sum(prom.query("qpipe_stages_in_progress").values()) == 0

        # images: one pass over each split per stage, counted exactly
        data = first["data"]
        images = {(dict(k)["stage"], dict(k)["phase"]): v
                  for k, v in prom.query("sum by (stage, phase) (qpipe_images_processed_total)").items()}
        assert images == {("finetune", "train"): data["train"], ("finetune", "eval"): data["val"],
                          ("calibrate", "calibrate"): 32, ("benchmark", "eval"): 2 * data["val"]}
        rates = prom.query("qpipe_images_per_second")
        assert len(rates) == 4 and all(v > 0 for v in rates.values()), rates

        # artifacts: at least the two deployable models went up, and came down again
        up_bytes = sum(prom.query("qpipe_artifact_uploaded_bytes_total").values())
        down_bytes = sum(prom.query("qpipe_artifact_downloaded_bytes_total").values())
        models = fp32["size_bytes"] + second["variants"][0]["size_bytes"]
        assert up_bytes > models and down_bytes > models, (up_bytes, down_bytes, models)

        # quality of the latest run, set by a report in a pool process that has exited since
        def quality(metric: str) -> dict[str, float]:
            return _by(prom.query(f'{metric}{{pipeline="digits-metrics"}}'), "variant")

        ptq = second["variants"][0]
        assert quality("qpipe_model_accuracy_top1") == pytest.approx(
            {"fp32": fp32["accuracy_top1"], "ptq-minmax": ptq["accuracy_top1"]})
        assert all(0.0 <= v <= 1.0 for v in quality("qpipe_model_accuracy_top1").values())
        assert quality("qpipe_model_accuracy_drop") == pytest.approx({"fp32": 0.0, "ptq-minmax": ptq["accuracy_drop"]})
        assert quality("qpipe_model_size_bytes") == {"fp32": fp32["size_bytes"], "ptq-minmax": ptq["size_bytes"]}
        latency = prom.query('qpipe_model_latency_seconds{pipeline="digits-metrics",variant="ptq-minmax"}')
        assert _by(latency, "batch_size") == pytest.approx(
            {b: ms / 1000 for b, ms in ptq["latency_ms_p50"].items()})

        # queues: empty now; each held a message while one of its stages ran (acks_late)
        # (the report's message is acknowledged just after the run's status is written: wait for it)
        empty = {("cpu", "waiting"): 0, ("cpu", "reserved"): 0, ("gpu", "waiting"): 0, ("gpu", "reserved"): 0}

        def queues_now() -> dict:
            got = prom.query("max by (queue, state) (qpipe_queue_messages)")
            return {(dict(k)["queue"], dict(k)["state"]): v for k, v in got.items()}

        wait_for(lambda: queues_now() == empty, timeout=30, every=0.5)
        held = prom.query('max by (queue) (max_over_time(qpipe_queue_messages{state="reserved"}[10m]))')
        assert _by(held, "queue") == {"cpu": 1.0, "gpu": 1.0}

        # the shipped alerting rules evaluate against the real series, and none fires
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 3 and all(r["health"] == "ok" for r in rules), rules
        assert not [r["name"] for r in rules if r["state"] == "firing"]

        # the prefork worker's folder holds no files of its exited pool processes
        folder = folders[1]
        pids = {int(m.group(1)) for f in folder.glob("*.db") if (m := re.search(r"_(\d+)\.db$", f.name))}
        assert all(Path(f"/proc/{p}").exists() for p in pids), (pids, sorted(os.listdir(folder)))
        assert len(list(folder.glob("*.db"))) <= 8, sorted(os.listdir(folder))
    assert prom.pid is None and not any(w.running for w in workers)
    assert not [f for f in folders if f.exists()], "a worker that stops removes its metrics folder"
