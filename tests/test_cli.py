"""The command line as users and other tools call it: the embedded default end to end, exit
codes, refused specs (nothing enqueued), an unreachable broker, and Ctrl-C stopping everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import yaml

from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "name": "tiny",
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "quantize": {"variants": [{"name": "ptq", "method": "static", "observer": "minmax"},
                              {"name": "dyn", "method": "dynamic"}]},
    "benchmark": {"batch_sizes": [1, 4], "iterations": 3, "warmup": 1, "accuracy_budget": 1.0,
                  "runtimes": ["torchscript"]},
}


def qpipe(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          env=full_env | {"PYTHONPATH": str(ROOT)}, timeout=timeout, cwd=cwd or ROOT)


def our_processes(home: Path) -> set[int]:
    """Pids of the valkey-servers and qpipe workers that a ``qpipe run`` with ``QPIPE_HOME=home``
    started (they inherit its environment), so that other tests running at the same time do
    not count."""
    mine = set()
    for proc in psutil.process_iter():
        try:
            cmdline = " ".join(proc.cmdline())
            if ("valkey-server" in cmdline or "workers.cli worker" in cmdline) \
                    and proc.environ().get("QPIPE_HOME") == str(home):
                mine.add(proc.pid)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return mine


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_embedded_default_end_to_end(tmp_path):
    spec = write_spec(tmp_path, TINY)
    out_json = tmp_path / "summary.json"
    proc = qpipe("run", str(spec), "--output-json", str(out_json), env={"QPIPE_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded default" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("variant"))
    assert header.split()[:5] == ["variant", "method", "top-1", "drop", "vs"]
    assert "p50 ms @1" in header and "p50 ms @4" in header and "size" in header and "selected" in header
    summary = json.loads(out_json.read_text())
    assert summary["status"] == "SUCCESS"
    assert [v["name"] for v in summary["variants"]] == ["ptq", "dyn"]
    assert summary["report"].startswith((tmp_path / "home" / "store").as_uri())
    assert Path(summary["baseline"]["artifact"][len("file://"):]).is_file()
    time.sleep(0.5)
    assert not our_processes(tmp_path / "home"), "the embedded run left processes behind"


def test_ctrl_c_stops_everything(tmp_path):
    spec = write_spec(tmp_path, {**TINY, "finetune": {"epochs": 50, "batch_size": 16}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")}
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env | {"PYTHONPATH": str(ROOT), "QPIPE_HOME": str(tmp_path / "home")},
                            # as from a terminal: a suite started as a background job inherits SIGINT
                            # ignored (POSIX), and the child would keep that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "finetune" in line and "running" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert our_processes(tmp_path / "home"), "the check must see the embedded cluster's processes"
    proc.send_signal(signal.SIGINT)
    try:  # stopping waits up to 30 s per worker before SIGKILL
        rest, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        pytest.fail("qpipe run did not exit within 90 s of Ctrl-C:\n" + "".join(lines) + rest)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    time.sleep(0.5)
    assert not our_processes(tmp_path / "home"), "Ctrl-C left processes behind"


@pytest.mark.parametrize("bad, field", [
    ({"finetune": {"epochs": 0}}, "finetune.epochs"),
    ({"model": {"arch": "resnt18"}}, "did you mean resnet18"),
    ({"surprise": 1}, "surprise: unknown key"),
    ({"name": "../escape"}, "name"),
], ids=["zero-epochs", "unknown-arch", "unknown-key", "name-traversal"])
def test_refused_spec_exits_2_and_enqueues_nothing(tmp_path, bad, field):
    spec = write_spec(tmp_path, {**TINY, **bad})
    with RedisServer(data_dir=tmp_path / "redis") as server:
        proc = qpipe("submit", str(spec), "--broker", server.url, "--store", (tmp_path / "store").as_uri())
        assert proc.returncode == 2, proc.stderr
        assert "refused" in proc.stderr and field in proc.stderr, proc.stderr
        r = redis.Redis.from_url(server.url)
        assert r.keys("*") == [], "a refused spec must not enqueue or record anything"
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def test_unreachable_broker_is_a_clear_error(tmp_path):
    spec = write_spec(tmp_path, TINY)
    t0 = time.monotonic()
    proc = qpipe("submit", str(spec), "--broker", f"redis://:hunter2secret@127.0.0.1:{free_port()}/0",
                 "--store", (tmp_path / "store").as_uri(), timeout=120)
    assert proc.returncode == 2
    assert "cannot reach the broker" in proc.stderr and "hunter2secret" not in proc.stderr + proc.stdout
    assert time.monotonic() - t0 < 60


def test_status_of_unknown_run(tmp_path):
    with RedisServer(data_dir=tmp_path / "redis") as server:
        proc = qpipe("status", "no-such-run", "--broker", server.url, "--store", (tmp_path / "s").as_uri())
    assert proc.returncode == 1 and "no run 'no-such-run'" in proc.stderr
