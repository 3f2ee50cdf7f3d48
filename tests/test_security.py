"""Security properties on real servers: workers refuse pickled messages (and run nothing) and
messages naming a store other than their own; the S3 keys and the broker password appear in no
log, output, object, Redis value, worker /metrics, Flower page or command line (a password given
with --broker is taken off it); the embedded default's broker wants a password of its own; the
CLI refuses an unreachable store or wrong credentials in one line; object keys cannot leave the
store's prefix."""

from __future__ import annotations

import base64
import gc
import json
import os
import secrets
import string
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml
from kombu import Connection
from PIL import Image

from pipeline.errors import ConfigError, SpecError
from pipeline.plan import build_plan
from pipeline.sources import prepare_sources
from pipeline.spec import load_spec
from pipeline.store import FileStore, S3Store, check_key, open_store
from tests.conftest import wait_for
from tests.servers import Cluster, FlowerProcess, env_vars, free_port, free_ports
from workers.app import app as shared_app
from workers.app import create_app
from workers.client import Client, check_broker
from workers.embedded import EmbeddedCluster, WorkerProcess
from workers.state import RunState, connect

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300
BUCKET, PREFIX = "secure", "pipe"


def letters(n: int) -> str:
    return "".join(secrets.choice(string.ascii_letters) for _ in range(n))


def tiny_spec(source: str, name: str = "secure", iterations: int = 1) -> dict:
    return {
        "name": name, "seed": 0,
        "data": {"source": source, "image_size": 16, "calib_size": 8},
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 0.01},
        "quantize": {"variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"}]},
        "benchmark": {"batch_sizes": [1], "iterations": iterations, "warmup": 0, "accuracy_budget": 1.0,
                      "runtimes": ["torchscript"]},
    }


def make_folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def redis_dump(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) for every key name and every value in every database, type-aware; kombu
    message envelopes also yield their base64-decoded body."""
    for db in range(16):
        r = redis.Redis.from_url(url, db=db)
        for key in r.scan_iter(count=500):
            name = key.decode(errors="replace")
            yield name, key
            kind = r.type(key).decode()
            if kind == "string":
                values = [r.get(key) or b""]
            elif kind == "hash":
                values = [b for kv in r.hgetall(key).items() for b in kv]
            elif kind == "list":
                values = r.lrange(key, 0, -1)
            elif kind == "set":
                values = list(r.smembers(key))
            elif kind == "zset":
                values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                values = [json.dumps(e, default=repr).encode() for e in r.xrange(key)]
            else:
                values = [repr(r.dump(key)).encode()]
            for v in values:
                yield name, v
                yield from ((name, b) for b in _decoded_bodies(v))


def _decoded_bodies(value: bytes) -> Iterator[bytes]:
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(obj, list):  # kombu's unacked entries: [message, exchange, routing_key]
        obj = obj[0] if obj and isinstance(obj[0], dict) else {}
    if isinstance(obj, dict) and isinstance(obj.get("body"), str) and \
            obj.get("properties", {}).get("body_encoding") == "base64":
        yield base64.b64decode(obj["body"])


# -------------------------------------------------------------------------- JSON only

class Evil:
    """Unpickling this runs code: it creates a folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_worker_refuses_pickle_and_still_runs_json(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    marker = tmp_path / "pickle-ran-code"
    spec = load_spec(tiny_spec("builtin:digits"))
    [json_node] = [n for n in build_plan(spec, prepare_sources(spec, store)) if n["stage"] == "ingest"]
    evil_spec = load_spec({**tiny_spec("builtin:digits"), "seed": 1})  # another ingest key
    [evil_node] = [n for n in build_plan(evil_spec, prepare_sources(evil_spec, store)) if n["stage"] == "ingest"]
    assert evil_node["key"] != json_node["key"]
    with Cluster(tmp_path, store.uri) as cluster:
        server = cluster.broker
        worker = cluster.worker("cpu", logs=tmp_path / "logs")
        r = redis.Redis.from_url(server.url)
        task_id = str(uuid.uuid4())
        body = (["pickled-run", {**evil_node, "payload": Evil(marker)}, store.uri], {},
                {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        headers = {"lang": "py", "task": "qpipe.ingest", "id": task_id, "root_id": task_id, "parent_id": None,
                   "group": None, "shadow": None, "eta": None, "expires": None, "retries": 0,
                   "timelimit": [None, None], "argsrepr": "(...)", "kwargsrepr": "{}", "origin": "attacker"}
        with Connection(server.url) as conn:
            conn.Producer().publish(body, exchange="", routing_key="cpu", serializer="pickle", headers=headers)
        deadline = time.monotonic() + 60
        log = ""
        while "untrusted content of type pickle" not in log:
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.2)
            log = worker.log_path.read_text(errors="replace")
        time.sleep(1.0)
        assert "Refusing to deserialize untrusted content of type pickle" in log
        assert "The message has been ignored and discarded" in log  # rejected, not requeued
        assert r.llen("cpu") == 0 and r.hlen("unacked") == 0, "the pickled message must not come back"
        assert f"Task qpipe.ingest[{task_id}] received" not in log
        # nothing ran: no code from the pickle, no run state, no stage output
        assert not marker.exists(), "unpickling ran attacker code"
        assert r.keys("qpipe:run:pickled-run*") == [] and r.keys("qpipe:lock:*") == []
        assert not store.exists(f"stages/ingest/{evil_node['key']}/manifest.json")
        assert store.list("stages") == []
        # the worker is alive and serves JSON
        assert worker.running
        app = create_app(server.url)
        assert app.control.ping(destination=[worker.node], timeout=10) == [{worker.node: {"ok": "pong"}}]
        result = app.send_task("qpipe.ingest", args=["json-run", json_node, store.uri], queue="cpu")
        assert result.get(timeout=120) == {"node": "ingest", "state": "done"}
        assert store.exists(f"stages/ingest/{json_node['key']}/manifest.json")
        assert not store.exists(f"stages/ingest/{evil_node['key']}/manifest.json") and not marker.exists()
        assert worker.running


# ------------------------------------------------------------------------------ secrets

@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An S3 server and a broker with recognizable secrets, a cpu worker (serving /metrics) and
    a gpu worker whose env holds the S3 secret, Flower, one run through Client.submit and one
    through the CLI."""
    from tests.servers import SeaweedS3Server

    tmp = tmp_path_factory.mktemp("secure")
    s3_secret = "S3SECRET" + letters(32)
    password = "BROKERPW" + letters(24)
    s3 = SeaweedS3Server(tmp / "s3", access_key="QPACCESS" + letters(12).upper(), secret_key=s3_secret)
    env = {"QPIPE_S3_ENDPOINT": s3.endpoint, "QPIPE_S3_ACCESS_KEY": s3.access_key,
           "QPIPE_S3_SECRET_KEY": s3_secret, "QPIPE_S3_SECURE": "false"}
    store = f"s3://{BUCKET}/{PREFIX}"
    metrics_port = free_ports(1)[0]
    with ExitStack() as stack:  # undone in reverse: Flower, the cluster, the environment, S3
        stack.enter_context(s3)  # started here
        s3.make_bucket(BUCKET)
        stack.enter_context(env_vars(env))  # the workers, Flower and this process's client hold the S3 keys
        cluster = stack.enter_context(Cluster(tmp, store, password=password))
        broker = cluster.broker
        logs = tmp / "worker-logs"
        workers = [cluster.worker("cpu", logs=logs, metrics_port=metrics_port, extra_args=("--loglevel", "DEBUG")),
                   cluster.worker("gpu", logs=logs)]
        # Flower (its env holds the S3 keys too) sees every task of both runs: it is up, and
        # receiving the workers' events, before the first run
        flower = stack.enter_context(FlowerProcess(broker.url, tmp / "flower"))  # started here
        wait_for(lambda: all(f'flower_worker_online{{worker="{w.node}"}} 1.0' in flower.text("/metrics")
                             for w in workers), timeout=60, every=0.5)
        data = make_folder(tmp / "data")
        handle = Client(broker.url, store).submit(tiny_spec(str(data)))
        summary = handle.wait(timeout=TIMEOUT)
        assert summary["status"] == "SUCCESS", (summary, [w.log_path.read_text()[-3000:] for w in workers])
        first_run = handle.run_id
        del handle  # its Client's result objects must be collected while the broker is up
        gc.collect()
        # the CLI, with everything from the environment and verbose logging
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(tiny_spec(str(data), name="secure-cli", iterations=2)))
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")} | env | {
            "QPIPE_BROKER_URL": broker.url, "QPIPE_STORE_URI": store, "PYTHONPATH": str(ROOT)}

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "workers.cli", "-v", *args], capture_output=True,
                                  text=True, env=cli_env, cwd=tmp, timeout=TIMEOUT)

        runs = [cli("submit", str(spec_path))]
        assert runs[0].returncode == 0, runs[0].stderr
        run_id = runs[0].stdout.strip().splitlines()[-1]
        runs.append(cli("watch", run_id))
        runs.append(cli("status", run_id, "--json"))
        runs.append(cli("status", run_id))
        assert [p.returncode for p in runs] == [0, 0, 0, 0], [p.stderr[-2000:] for p in runs]
        cli_summary = json.loads(runs[2].stdout)
        assert cli_summary["status"] == "SUCCESS" and cli_summary["run_id"] == run_id
        time.sleep(1.0)  # let the workers flush their last log lines
        yield {"s3": s3, "broker": broker, "workers": workers, "secret": s3_secret, "password": password,
               "summary": summary, "cli_summary": cli_summary, "run_ids": [first_run, run_id],
               "cli_output": "\n".join(p.stdout + "\n" + p.stderr for p in runs), "store": store, "env": env,
               "flower": flower, "metrics_port": metrics_port, "data": data}


def needles(secure: dict, access_key: bool = False) -> dict[str, bytes]:
    found = {"S3 secret key": secure["secret"].encode(), "broker password": secure["password"].encode()}
    if access_key:
        found["S3 access key"] = secure["s3"].access_key.encode()
    return found


def assert_clean(where: str, data: bytes | str, secure: dict, access_key: bool = False) -> None:
    raw = data.encode(errors="surrogateescape") if isinstance(data, str) else data
    for what, needle in needles(secure, access_key).items():
        assert needle not in raw, f"the {what} appears in {where}"


def group_cmdlines(pgid: int) -> dict[int, bytes]:
    """The command line of every process in process group ``pgid``: a process started by
    ServerProcess (a session of its own) and everything it started, such as a worker's pool
    processes, which Celery forks."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # it exited meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp... after "(command name)"
        if int(fields[2]) == pgid and cmdline:
            found[int(proc.name)] = cmdline
    return found


def worker_groups(workers: list[WorkerProcess]) -> dict[str, dict[int, bytes]]:
    """Each worker's command lines, once its pool process is there (a gpu worker replaces its
    pool process after each stage)."""
    def with_pool(w: WorkerProcess) -> dict[int, bytes] | None:
        found = group_cmdlines(w.pid)
        return found if len(found) >= 2 else None

    return {w.node: wait_for(lambda w=w: with_pool(w), timeout=30) for w in workers}


def test_secrets_are_not_in_worker_logs(secure: dict) -> None:
    logs = [w.log_path for w in secure["workers"]]
    assert all(p.stat().st_size > 0 for p in logs)
    text = ""
    for path in {p.parent for p in logs}:
        for f in path.iterdir():
            text += f.read_text(errors="replace")
            assert_clean(f"worker log {f.name}", f.read_bytes(), secure)
    # the logs are not just empty: the stages ran and were logged (DEBUG on the cpu worker)
    assert "Task qpipe.finetune[" in text and "Task qpipe.report[" in text and "succeeded" in text
    assert " DEBUG " in text


def test_secrets_are_not_in_cli_output(secure: dict) -> None:
    out = secure["cli_output"]
    assert secure["run_ids"][1] in out and "SUCCESS" in out and "ptq-minmax" in out
    assert_clean("the CLI output", out, secure)


def test_secrets_are_not_in_any_object(secure: dict) -> None:
    client = secure["s3"].client()
    names = []
    for bucket in client.list_buckets():
        for obj in client.list_objects(bucket.name, recursive=True):
            names.append(f"{bucket.name}/{obj.object_name}")
            resp = client.get_object(bucket.name, obj.object_name)
            try:
                assert_clean(f"s3://{bucket.name}/{obj.object_name}", resp.read(), secure)
            finally:
                resp.close()
                resp.release_conn()
    # what was searched: the uploaded dataset, every stage's outputs, both runs' summaries
    assert any("/sources/" in n for n in names) and any(n.endswith("/model.ts") for n in names)
    for run_id in secure["run_ids"]:
        assert f"{BUCKET}/{PREFIX}/runs/{run_id}/summary.json" in names
    assert_clean("the key names", "\n".join(names), secure)


def test_secrets_are_not_in_redis(secure: dict) -> None:
    # positive control: a password hidden in a kombu envelope's base64 body is found
    canary = redis.Redis.from_url(secure["broker"].url, db=15)
    body = base64.b64encode(b'{"x": "' + secure["password"].encode() + b'"}').decode()
    canary.hset("canary", "tag", json.dumps([{"body": body, "properties": {"body_encoding": "base64"}}, "", "cpu"]))
    try:
        with pytest.raises(AssertionError, match="broker password appears in redis key 'canary'"):
            for name, value in redis_dump(secure["broker"].url):
                assert_clean(f"redis key {name!r}", value, secure)
    finally:
        canary.delete("canary")
    seen = 0
    kinds = set()
    r = redis.Redis.from_url(secure["broker"].url)
    for name, value in redis_dump(secure["broker"].url):
        seen += 1
        kinds.add(r.type(name).decode() if r.exists(name) else "?")
        assert_clean(f"redis key {name!r}", value, secure)
    run_id = secure["run_ids"][0]
    assert r.exists(f"qpipe:run:{run_id}") and r.exists(f"qpipe:run:{run_id}:stages")
    assert seen > 20 and {"hash", "zset", "string"} <= kinds, (seen, kinds)


def test_secrets_are_not_in_the_summaries(secure: dict) -> None:
    for s in (secure["summary"], secure["cli_summary"]):
        text = json.dumps(s)
        assert s["status"] == "SUCCESS" and s["report"].startswith(secure["store"] + "/")
        assert_clean(f"the summary of {s['run_id']}", text, secure)


def test_worker_command_line_holds_no_s3_secret(secure: dict) -> None:
    """Anything on a command line is readable by every local user (ps, /proc/PID/cmdline)."""
    cmdlines = [Path(f"/proc/{w.pid}/cmdline").read_bytes() for w in secure["workers"]]
    assert all(b"workers.cli" in c and b"worker" in c for c in cmdlines)
    assert_clean("a worker's command line", b"".join(cmdlines), {**secure, "password": "(not checked here)"})


def test_worker_command_line_holds_no_broker_password(secure: dict) -> None:
    cmdlines = [Path(f"/proc/{w.pid}/cmdline").read_bytes() for w in secure["workers"]]
    assert all(b"workers.cli" in c for c in cmdlines)
    assert_clean("a worker's command line", b"".join(cmdlines), secure)


def test_secrets_are_not_in_worker_metrics(secure: dict) -> None:
    url = f"http://127.0.0.1:{secure['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    # what was searched: the cpu worker's metrics, with the stages of both runs in them
    cpu = secure["workers"][0]
    assert f'node="{cpu.node}"' in text and "qpipe_stage_duration_seconds_count" in text
    assert 'stage="benchmark"' in text and "qpipe_artifact_downloaded_bytes_total" in text
    assert_clean("the worker's /metrics", text, secure, access_key=True)


def test_secrets_are_not_in_flower(secure: dict) -> None:
    flower = secure["flower"]

    def reports() -> list[dict]:  # Flower has the events of both runs' last stage
        tasks = flower.get("/api/tasks?limit=1000")
        done = [t for t in tasks.values() if t["name"] == "qpipe.report" and t.get("state") == "SUCCESS"]
        return done if all(any(r in str(t.get("args")) for t in done) for r in secure["run_ids"]) else []

    reports = wait_for(reports, timeout=60, every=1.0)
    workers = flower.get("/api/workers?refresh=true")
    nodes = [w.node for w in secure["workers"]]
    assert set(nodes) <= set(workers), sorted(workers)
    for node in nodes:  # Flower shows each worker's Celery settings and broker: masked
        conf, broker = workers[node]["conf"], workers[node]["stats"]["broker"]
        assert conf["broker_url"].startswith("redis://:**") and broker["port"] == secure["broker"].port
    pages = ["/api/tasks?limit=1000", "/api/workers?refresh=true", "/broker", "/workers", "/tasks", "/metrics",
             *(f"/worker/{n}" for n in nodes), *(f"/task/{t['uuid']}" for t in reports),
             *(f"/api/task/info/{t['uuid']}" for t in reports)]
    for page in pages:
        assert_clean(f"Flower's {page}", flower.text(page), secure, access_key=True)
    assert secure["run_ids"][0] in flower.text("/api/tasks?limit=1000")
    assert_clean("Flower's log", flower.log_path.read_bytes(), secure, access_key=True)


def test_secrets_are_on_no_command_line(secure: dict) -> None:
    """Every process started: each worker with its pool processes, and Flower; and all of ps."""
    groups = worker_groups(secure["workers"]) | {"flower": group_cmdlines(secure["flower"].pid)}
    assert groups["flower"] and all(b"workers.cli" in next(iter(g.values())) for g in groups.values())
    for name, cmdlines in groups.items():
        for pid, cmdline in cmdlines.items():
            assert_clean(f"the command line of {name} (pid {pid})", cmdline, secure, access_key=True)
    ps = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,args="], capture_output=True, check=True).stdout
    assert str(secure["workers"][0].pid).encode() in ps
    assert_clean("ps", ps, secure, access_key=True)


class ArgvWorker(WorkerProcess):
    """A worker told the broker URL, password included, with --broker on its command line."""

    def _command(self) -> list[str]:
        return [*super()._command(), "--broker", self.broker]

    def _child_env(self) -> dict[str, str]:
        env = super()._child_env()
        del env["QPIPE_BROKER_URL"]
        return env


class ArgvFlower(FlowerProcess):
    """Flower told the broker URL with --broker on its command line."""

    def _command(self) -> list[str]:
        cmd = super()._command()
        at = cmd.index("--port")
        return [*cmd[:at], "--broker", self.broker, *cmd[at:]]

    def _child_env(self) -> dict[str, str]:
        env = super()._child_env()
        del env["QPIPE_BROKER_URL"]
        return env


ARGV_WARNING = "qpipe: warning: the --broker URL holds a password"


def test_a_broker_password_given_with_broker_is_taken_off_every_command_line(secure: dict, tmp_path: Path) -> None:
    url = secure["broker"].url
    worker = ArgvWorker("cpu", url, secure["store"], tmp_path / "logs")
    flower = ArgvFlower(url, tmp_path / "flower")
    assert url in worker._command() and "QPIPE_BROKER_URL" not in worker._child_env()
    try:
        worker.start()
        flower.start()
        # both reached the broker with the password: the worker answers a ping, Flower lists it
        app = create_app(url)
        assert app.control.ping(destination=[worker.node], timeout=10) == [{worker.node: {"ok": "pong"}}]
        wait_for(lambda: worker.node in flower.get("/api/workers?refresh=true"), timeout=60, every=1.0)
        groups = worker_groups([worker]) | {"flower": group_cmdlines(flower.pid)}
        for name, cmdlines in groups.items():
            for pid, cmdline in cmdlines.items():
                assert b"workers.cli" in cmdline and b"--broker" not in cmdline, cmdline
                assert_clean(f"the command line of {name} (pid {pid})", cmdline, secure)
        for log in (worker.log_path, flower.log_path):  # warned once, and logged no password
            text = log.read_text(errors="replace")
            assert text.count(ARGV_WARNING) == 1 and "set QPIPE_BROKER_URL instead" in text, text[-3000:]
            assert_clean(log.name, text, secure)
    finally:
        gc.collect()
        flower.stop()
        worker.stop()
    # a short command: the same warning, on stderr, and it works
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")} | secure["env"] | {
        "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "workers.cli", "status", secure["run_ids"][1], "--broker", url,
                           "--store", secure["store"], "--json"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "SUCCESS"
    assert proc.stderr.count(ARGV_WARNING) == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert_clean("the warned command's output", proc.stdout + proc.stderr, secure)


def test_a_worker_refuses_a_message_naming_another_store(secure: dict, tmp_path: Path) -> None:
    other = tmp_path / "other-store"
    other.mkdir()
    # a built-in dataset reads nothing from a store: a worker that served the message would
    # write its ingest outputs into the other store (a seed of its own: a stage no run computed)
    spec = load_spec({**tiny_spec("builtin:digits"), "seed": 7})
    [node] = [n for n in build_plan(spec, prepare_sources(spec, open_store(secure["store"])))
              if n["stage"] == "ingest"]
    assert not open_store(secure["store"]).exists(f"stages/ingest/{node['key']}/manifest.json")
    app = create_app(secure["broker"].url)
    run_id = f"other-store-{uuid.uuid4().hex[:8]}"
    refused = app.send_task("qpipe.ingest", args=[run_id, node, other.as_uri()], queue="cpu")
    served = None
    try:
        assert refused.get(timeout=120) == {"node": "ingest", "state": "failed"}
        stage = RunState(connect(secure["broker"].url), run_id).stage("ingest")
        assert stage["state"] == "failed", stage
        assert f"names the store {other.as_uri()}, but its worker serves {secure['store']}" in stage["error"]
        log = secure["workers"][0].log_path.read_text(errors="replace")
        assert f"{run_id} ingest refused: it names the store {other.as_uri()}" in log
        assert list(other.rglob("*")) == [], "the worker wrote into a store that is not its own"
        # the same stage naming the worker's own store is served
        served = app.send_task("qpipe.ingest", args=[run_id + "-own", node, secure["store"]], queue="cpu")
        assert served.get(timeout=120) == {"node": "ingest", "state": "done"}
        assert open_store(secure["store"]).exists(f"stages/ingest/{node['key']}/manifest.json")
        assert list(other.rglob("*")) == []
    finally:
        del refused, served, app
        gc.collect()  # AsyncResult.__del__ talks to the broker: let it run while the broker is up


def test_a_worker_without_a_store_refuses_to_start(secure: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")} | {
        "QPIPE_BROKER_URL": secure["broker"].url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "workers.cli", "worker", "--queues", "cpu"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "a worker needs its artifact store: pass --store URI or set QPIPE_STORE_URI" in proc.stderr


def test_submit_with_the_store_unreachable_exits_2_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec("builtin:digits")))
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")} | {
        "QPIPE_S3_ENDPOINT": endpoint, "QPIPE_S3_ACCESS_KEY": "QPACCESS", "QPIPE_S3_SECURE": "false",
        "QPIPE_S3_SECRET_KEY": "S3SECRET" + letters(32), "QPIPE_STORE_ATTEMPTS": "2", "PYTHONPATH": str(ROOT),
        "QPIPE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}

    def submit(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers.cli", *flags, "submit", str(spec), "--store",
                               "s3://qpipe/runs"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    quiet = submit()
    assert quiet.returncode == 2 and quiet.stdout == "", quiet.stderr
    [line] = quiet.stderr.splitlines()
    assert line.startswith(f"qpipe: object store {endpoint} unreachable") and "QPIPE_S3_ENDPOINT" in line, line
    # the store was tried again before the CLI gave up: -v shows the retry, then the same line
    verbose = submit("-v")
    assert verbose.returncode == 2 and "Traceback" not in verbose.stderr, verbose.stderr
    assert f"bucket check on {endpoint} failed" in verbose.stderr and "retry 1/1" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == line


def test_torch_has_the_weights_only_fix() -> None:
    """Before torch 2.6, torch.load(weights_only=True) could still be made to run code
    (CVE-2025-32434); qpipe loads every stored checkpoint that way."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    [torch] = [d for d in deps if d.name == "torch"]
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0"), torch
    assert Version(version("torch")) >= Version("2.6")


def test_embedded_broker_refuses_clients_without_its_password(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="workers.embedded")
    data = make_folder(tmp_path / "data")
    with EmbeddedCluster(home=tmp_path / "home") as cluster:
        server = cluster.redis
        password = server.password
        assert password and len(password) >= 40 and f":{password}@" in cluster.broker
        # another local user reaches the port, but can neither read nor enqueue
        for intruder in (redis.Redis(host=server.host, port=server.port),
                         redis.Redis(host=server.host, port=server.port, password="guess-" + letters(20))):
            with pytest.raises(redis.AuthenticationError):
                intruder.ping()
            with pytest.raises(redis.AuthenticationError):
                intruder.lpush("cpu", b"{}")
        handle = Client(cluster.broker, cluster.store).submit(tiny_spec(str(data), name="embedded"))
        summary = handle.wait(timeout=TIMEOUT)
        assert summary["status"] == "SUCCESS", (summary, cluster.logs())
        assert {s["worker"] for s in summary["stages"]} == {w.node for w in cluster.workers}
        # the workers were given the password through their environment, not their command line
        for node, cmdlines in worker_groups(cluster.workers).items():
            assert all(password.encode() not in c for c in cmdlines.values()), node
        # AsyncResult.__del__ talks to the broker: let it run while the broker is up. The Client's
        # app is Celery's current app, which Celery holds on to: make the shared app current.
        del handle
        shared_app.set_current()
        gc.collect()
    assert "embedded cluster up" in caplog.text and password not in caplog.text


def test_wrong_credentials_are_refused_without_the_secret(secure: dict, tmp_path: Path) -> None:
    wrong = "WRONGSECRET" + letters(29)
    with pytest.raises(ConfigError) as info:
        S3Store(secure["store"], secret_key=wrong).check()
    assert "refused the credentials" in str(info.value)
    for text in (str(info.value), repr(info.value)):
        assert wrong not in text and secure["secret"] not in text
    bad_pw = "WRONGPW" + letters(20)
    with pytest.raises(ConfigError) as info:
        check_broker(f"redis://:{bad_pw}@127.0.0.1:{secure['broker'].port}/0")
    assert "refused the password" in str(info.value) and bad_pw not in str(info.value)
    # and through the CLI: exit status 2, neither secret in the output
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec("builtin:digits")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")} | secure["env"] | {
        "QPIPE_S3_SECRET_KEY": wrong, "QPIPE_BROKER_URL": secure["broker"].url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "workers.cli", "-v", "submit", str(spec), "--store",
                           secure["store"]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "refused the credentials" in proc.stderr, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if " INFO " not in ln]  # -v adds INFO lines
    assert line.startswith("qpipe: refused: the S3 server") and "QPIPE_S3_SECRET_KEY" in line, proc.stderr
    assert wrong not in proc.stdout + proc.stderr
    assert_clean("the refused CLI's output", proc.stdout + proc.stderr, secure)


# ------------------------------------------------------------------------------ object keys

@pytest.mark.parametrize("key", ["../x", "a/../b", "a/..", "/abs/path", "a//b", "", ".", "a/./b", "a\\b",
                                 "runs/../../etc/passwd", "a/b/", "runs/x y", "stages/\x00"])
def test_check_key_refuses_traversal(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsafe artifact key"):
        check_key(key)
    store = FileStore(tmp_path / "root" / "store")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"escaped")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_check_key_accepts_the_store_layout() -> None:
    for key in ("runs/r-1/summary.json", "stages/ingest/0a1b/train-00000.pt", "sources/ab12.tar.gz"):
        assert check_key(key) == key


@pytest.mark.parametrize("name", ["..", "../escape", "a/../b", "team/run", "a..b", "/abs"])
def test_run_name_with_traversal_is_refused(name: str, secure: dict) -> None:
    r = redis.Redis.from_url(secure["broker"].url)
    before = sorted(r.scan_iter("qpipe:run*"))
    with pytest.raises(SpecError, match=r"without '/' or '\.\.'"):
        Client(secure["broker"].url, secure["store"]).submit({**tiny_spec("builtin:digits"), "name": name})
    assert sorted(r.scan_iter("qpipe:run*")) == before


def test_every_object_is_under_the_store_prefix(secure: dict) -> None:
    client = secure["s3"].client()
    assert [b.name for b in client.list_buckets()] == [BUCKET]
    names = [o.object_name for o in client.list_objects(BUCKET, recursive=True)]
    assert len(names) > 10
    outside = [n for n in names if not n.startswith(PREFIX + "/")]
    assert outside == []
    assert all(".." not in n.split("/") and "//" not in n for n in names)
    # the summary's URIs point inside the prefix too
    s = secure["summary"]
    for uri in [s["report"], s["baseline"]["artifact"], *(v["artifact"] for v in s["variants"])]:
        assert uri.startswith(f"s3://{BUCKET}/{PREFIX}/"), uri


def test_status_of_a_traversal_run_id_reads_nothing_outside(secure: dict) -> None:
    client = Client(secure["broker"].url, secure["store"])
    for run_id in ("../../etc/passwd", "../pipe/runs"):
        with pytest.raises(KeyError, match="no run"):
            client.run(run_id).status()
