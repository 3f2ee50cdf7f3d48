"""A stage that kills its process on every delivery ends FAILED after QPIPE_MAX_DELIVERIES
deliveries, naming the signal, instead of being put back in its queue forever.

The killer is the kernel's own: the gpu-queue worker runs in a cgroup v1 memory cgroup with room
for a mobilenet_v3_small fine-tune and not for a wide_resnet101_2 one, and the spec sweeps both
archs. The OOM killer ends the big fine-tune's pool process on each delivery; the small arch's
branch finishes, the run ends FAILED, and both workers go on taking tasks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_faults import FAST_LEASES, Fleet, stage_state
from workers.deliveries import explain

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 2  # QPIPE_MAX_DELIVERIES for the run below: one death fewer to wait for than the default
# memory charged to the cgroup is what the worker allocates once moved in (the pool process's
# work): wide_resnet101_2's 125M float32 weights alone are 500 MB, and training holds their
# gradients and momentum too; the small arch needs a fraction of the limit
MEMORY_LIMIT = 700 * 2**20
BIG, SMALL = "wide_resnet101_2", "mobilenet_v3_small"
SPEC = {
    "name": "poison",
    "seed": 11,
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
    "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.01},
    "sweep": {"archs": [BIG, SMALL]},
    "quantize": {"variants": [{"name": "dyn", "method": "dynamic"}]},
    "benchmark": {"batch_sizes": [1], "iterations": 3, "warmup": 1, "runtimes": ["torchscript"]},
}


class MemoryCgroup:
    """A child of this process's cgroup v1 memory cgroup, with a hard limit (swap included)."""

    def __init__(self, limit: int) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root: creating a memory cgroup and moving a worker into it")
        own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.split(":")[1] == "memory"), None)
        self.parent = Path("/sys/fs/cgroup/memory") / (own or "").lstrip("/")
        if own is None or not (self.parent / "memory.limit_in_bytes").exists():
            pytest.skip("no cgroup v1 memory controller (/sys/fs/cgroup/memory) for this process")
        self.path = self.parent / f"qpipe-poison-{os.getpid()}"
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as err:
            self.remove()
            pytest.skip(f"cannot create a memory cgroup under {self.parent}: {err}")

    def add_group(self, pgid: int) -> list[int]:
        """Move every process of a process group (a worker and its pool) into the cgroup."""
        out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=True)
        pids = [int(p) for p in out.stdout.split()]
        for pid in pids:
            (self.path / "cgroup.procs").write_text(str(pid))
        return pids

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(fields["oom_kill"])

    def remove(self) -> None:
        if not self.path.exists():
            return
        for pid in (self.path / "cgroup.procs").read_text().split():  # a survivor goes back where it was
            try:
                (self.parent / "cgroup.procs").write_text(pid)
            except OSError:  # it exited meanwhile
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # the last process is still being torn down
                time.sleep(0.1)
        self.path.rmdir()


@pytest.fixture
def memory_cgroup():
    cgroup = MemoryCgroup(MEMORY_LIMIT)
    yield cgroup
    cgroup.remove()


@pytest.mark.integration
def test_stage_killed_on_every_delivery_fails_the_run_and_the_workers_go_on(tmp_path, s3_env, memory_cgroup):
    fleet = Fleet(tmp_path, "s3://qpipe/poison",
                  {**FAST_LEASES, "QPIPE_LOCK_TTL": "600", "QPIPE_MAX_DELIVERIES": str(LIMIT)})
    try:
        cpu = fleet.worker("cpu")
        gpu = fleet.worker("gpu")
        assert len(memory_cgroup.add_group(gpu.pid)) >= 2, "the worker and its pool process"
        handle = fleet.client().submit(copy.deepcopy(SPEC))
        summary = handle.wait(timeout=240)
        logs = fleet.logs()
        assert summary["status"] == "FAILED", logs[-3000:]

        poisoned = stage_state(handle, f"finetune@{BIG}")
        assert poisoned["state"] == "failed"
        assert (f"the worker process was killed by signal 9 (SIGKILL) on {LIMIT} deliveries "
                f"(QPIPE_MAX_DELIVERIES={LIMIT}); not run again; out of memory?") in poisoned["error"], poisoned
        # the kernel killed it, once per delivery that ran; the next delivery read the count
        assert memory_cgroup.oom_kills() >= LIMIT
        assert logs.count("WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)") == LIMIT, logs[-4000:]
        assert f"finetune {poisoned['key']}: delivery {LIMIT}; {LIMIT - 1} before it died without finishing" in logs
        # the worker's main process freed the dead holder's stage lock (its TTL here is 10 min), so
        # no redelivery waited for it
        assert "is held: the same stage is running elsewhere" not in logs, logs[-4000:]
        counter = f"qpipe:deliveries:finetune:{poisoned['key']}"
        assert fleet.client().redis.exists(counter, f"{counter}:causes") == 0, "the failure clears the count"
        for s in handle.status()["stages"]:
            if s["id"].endswith(f"@{SMALL}"):
                assert s["state"] == "done", s  # the other arch finished
            elif s["id"].endswith(f"@{BIG}") and s["stage"] != "finetune":
                assert s["state"] == "failed" and s["error"].startswith("not run: upstream"), s

        # both workers are alive and take the next task: a run of the small arch with new keys
        assert cpu.running and gpu.running
        again = fleet.client().submit({**copy.deepcopy(SPEC), "seed": 12, "sweep": {"archs": [SMALL]}})
        assert again.wait(timeout=180)["status"] == "SUCCESS", fleet.logs()[-3000:]
        finetune = next(s for s in again.status()["stages"] if s["stage"] == "finetune")
        assert finetune["state"] == "done" and finetune["worker"] == gpu.node, finetune
    finally:
        fleet.stop()


def _max_deliveries(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QPIPE_MAX_DELIVERIES"}
    if value is not None:
        env["QPIPE_MAX_DELIVERIES"] = value
    return subprocess.run([sys.executable, "-c", "import workers.app as a; print(a.MAX_DELIVERIES)"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_max_deliveries_defaults_to_3_and_refuses_0():
    assert _max_deliveries(None).stdout.strip() == "3"
    assert _max_deliveries("5").stdout.strip() == "5"
    refused = _max_deliveries("0")
    assert refused.returncode != 0
    assert "QPIPE_MAX_DELIVERIES (0) must be at least 1" in refused.stderr


def test_the_cause_names_each_signal_and_the_deliveries_nobody_explained():
    text = explain(3, {"signal 11 (SIGSEGV)": 2}, 3)
    assert text.startswith("the worker process was killed by signal 11 (SIGSEGV) on 2 deliveries, "
                           "was lost with its whole worker (no cause recorded) on 1 delivery (QPIPE_MAX_DELIVERIES=3)")
    assert "a crash in native code" in text and "out of memory?" in text  # a lost worker may have been OOM-killed
    assert "out of memory?" not in explain(2, {"exitcode 1": 2}, 2)
