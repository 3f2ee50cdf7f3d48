"""Security properties on real servers: workers refuse pickled messages (and run nothing), the
S3 secret key and the broker password appear in no log, output, object or Redis value, and
object keys cannot leave the store's prefix."""

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
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml
from kombu import Connection
from PIL import Image

from pipeline.errors import ConfigError, SpecError
from pipeline.plan import build_plan
from pipeline.runner import prepare_sources
from pipeline.spec import load_spec
from pipeline.store import FileStore, S3Store, check_key
from workers.app import create_app
from workers.client import Client, check_broker
from workers.embedded import WorkerProcess
from workers.servers import RedisServer

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
    with RedisServer(data_dir=tmp_path / "redis") as server:
        worker = WorkerProcess("cpu", server.url, store.uri, tmp_path / "logs").start()
        try:
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
        finally:
            worker.stop()
            gc.collect()  # AsyncResult.__del__ talks to the broker: let it run while the broker is up


# ------------------------------------------------------------------------------ secrets

@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An S3 server and a broker with recognizable secrets, a cpu and a gpu worker whose env
    holds the S3 secret, one run through Client.submit and one through the CLI."""
    from tests.servers import SeaweedS3Server

    tmp = tmp_path_factory.mktemp("secure")
    s3_secret = "S3SECRET" + letters(32)
    password = "BROKERPW" + letters(24)
    s3 = SeaweedS3Server(tmp / "s3", access_key="QPACCESS" + letters(12).upper(), secret_key=s3_secret)
    broker = RedisServer(data_dir=tmp / "redis", password=password)
    env = {"QPIPE_S3_ENDPOINT": s3.endpoint, "QPIPE_S3_ACCESS_KEY": s3.access_key,
           "QPIPE_S3_SECRET_KEY": s3_secret, "QPIPE_S3_SECURE": "false"}
    old = {k: os.environ.get(k) for k in env}
    workers: list[WorkerProcess] = []
    store = f"s3://{BUCKET}/{PREFIX}"
    try:
        s3.start()
        s3.make_bucket(BUCKET)
        broker.start()
        os.environ.update(env)
        logs = tmp / "worker-logs"
        workers = [WorkerProcess("cpu", broker.url, store, logs, extra_args=("--loglevel", "DEBUG")),
                   WorkerProcess("gpu", broker.url, store, logs)]
        for w in workers:
            w.start()
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
               "cli_output": "\n".join(p.stdout + "\n" + p.stderr for p in runs), "store": store, "env": env}
    finally:
        gc.collect()  # AsyncResult.__del__ talks to the broker: let it run while the broker is up
        for w in workers:
            w.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        broker.stop()
        s3.stop()


def needles(secure: dict) -> dict[str, bytes]:
    return {"S3 secret key": secure["secret"].encode(), "broker password": secure["password"].encode()}


def assert_clean(where: str, data: bytes | str, secure: dict) -> None:
    raw = data.encode(errors="surrogateescape") if isinstance(data, str) else data
    for what, needle in needles(secure).items():
        assert needle not in raw, f"the {what} appears in {where}"


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
