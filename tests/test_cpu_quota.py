"""Threads from the container's CPU quota (workers/cpu_quota.py): the quota read from fake cgroup
v2 and v1 trees (a container's own, a nested pod/container pair whose smaller limit wins, none),
the thread count it gives, what the user's OMP_NUM_THREADS changes, ``apply`` setting
OMP_NUM_THREADS; and a real ``qpipe worker`` that logs the decision at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers import cpu_quota
from workers.cpu_quota import cpu_quota as read_quota
from workers.cpu_quota import decide, threads_for


def _v2(root: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree under ``root`` (cpu.max per cgroup path) and a /proc/self/cgroup naming ``own``."""
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for path, value in limits.items():
        d = root / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value + "\n")
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def _v1(root: Path, mount: str, own: str, limits: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """A cgroup v1 cpu controller mounted at ``root/mount`` (quota, period per cgroup path)."""
    for path, (quota, period) in limits.items():
        d = root / mount / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    (root / "memory").mkdir(parents=True, exist_ok=True)
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"4:memory:{own}\n2:{mount}:{own}\n0::/\n")
    return root, proc


def test_cgroup_v2_quota_of_a_container(tmp_path):
    # a container with its own cgroup namespace sees its cgroup at the root: "0::/"
    root, proc = _v2(tmp_path / "cg", "/", {"/": "150000 100000"})
    assert read_quota(root, proc) == 1.5
    threads, reason = decide({}, 8, root, proc)
    assert threads == 1 and "1.5 CPUs" in reason and "8 core(s)" in reason


def test_cgroup_v2_nested_limits_keep_the_smallest(tmp_path):
    # a pod limited to 3 CPUs, its container to 6 (the pod's limit binds), seen from the host's view
    root, proc = _v2(tmp_path / "cg", "/kubepods/pod1/ctr", {
        "/kubepods/pod1": "300000 100000", "/kubepods/pod1/ctr": "600000 100000", "/kubepods": "max 100000"})
    assert read_quota(root, proc) == 3.0
    assert decide({}, 16, root, proc)[0] == 3


def test_cgroup_v2_without_a_quota_sets_nothing(tmp_path):
    root, proc = _v2(tmp_path / "cg", "/", {"/": "max 100000"})
    assert read_quota(root, proc) is None
    threads, reason = decide({}, 4, root, proc)
    assert threads is None and "no CPU quota" in reason


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path, mount):
    # v1 inside a container: /proc/self/cgroup names the host's path, which the container does not
    # see; its own cgroup is mounted at the controller's root
    root, proc = _v1(tmp_path / "cg", mount, "/docker/abc", {"/": (250000, 100000)})
    assert read_quota(root, proc) == 2.5
    assert decide({}, 32, root, proc)[0] == 2
    unlimited, proc = _v1(tmp_path / "cg2", mount, "/", {"/": (-1, 100000)})
    assert read_quota(unlimited, proc) is None


def test_thread_count_rounds_down_and_stays_within_the_cores():
    assert threads_for(0.5, 8) == 1  # less than one CPU: still one thread
    assert threads_for(2.9, 8) == 2  # a third thread would wait throttled
    assert threads_for(16.0, 4) == 4  # a quota above the cores the process may use
    assert threads_for(None, 6) == 6


def test_the_users_choice_and_a_quota_above_the_cores_leave_threads_alone(tmp_path):
    root, proc = _v2(tmp_path / "cg", "/", {"/": "200000 100000"})
    threads, reason = decide({"OMP_NUM_THREADS": "7"}, 8, root, proc)
    assert threads is None and "OMP_NUM_THREADS=7" in reason and "kept" in reason
    assert decide({}, 2, root, proc)[0] is None  # 2 CPUs on 2 cores: torch's default is already right


def test_apply_sets_omp_num_threads(tmp_path, monkeypatch):
    root, proc = _v2(tmp_path / "cg", "/", {"/": "100000 100000"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores, so that a 1-CPU quota is below them")
    assert cpu_quota.apply(root, proc) == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_quota.apply(root, proc) is None and os.environ["OMP_NUM_THREADS"] == "5"


@pytest.mark.integration
def test_a_worker_logs_its_thread_decision_at_start(tmp_path):
    """A real ``qpipe worker`` (no --cpus) runs the quota step before torch is imported and logs
    it: with OMP_NUM_THREADS in its environment, that the user's choice is kept."""
    from tests.helpers import wait_for
    from tests.servers import Cluster

    fleet = Cluster(tmp_path, (tmp_path / "store").as_uri(), {"OMP_NUM_THREADS": "1"})
    try:
        w = fleet.worker("cpu")
        line = wait_for(lambda: next((ln for ln in w.log_path.read_text(errors="replace").splitlines()
                                      if "workers.cpu_quota" in ln or "OMP_NUM_THREADS=1 set" in ln), None),
                        timeout=60)
        assert "OMP_NUM_THREADS=1 set in the environment: kept" in line, line
    finally:
        fleet.stop()
