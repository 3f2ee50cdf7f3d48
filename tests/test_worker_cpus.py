"""``qpipe worker --cpus``: a real worker process started with the option runs, with its pool
process, on the cores it was given, with one torch thread per core, read from outside through
psutil and from the pool process's own log line; a core list it cannot use is refused before
anything starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

from tests.helpers import wait_for
from tests.servers import Cluster
from workers.cpus import parse_cpus

POOL_LINE = re.compile(r"pool process 0 \(pid (\d+)\): cpus ([\d,-]+), torch threads (\d+)")


@pytest.mark.integration
def test_a_pinned_worker_and_its_pool_process_run_on_their_cores_with_one_thread_each(tmp_path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    wanted = {"one": [cores[-1]], "all": cores}  # the last core alone, and every core (two threads on 2 cores)
    # an OMP_NUM_THREADS of the worker's environment, which torch would follow, gives way to the pinned cores
    fleet = Cluster(tmp_path, (tmp_path / "store").as_uri(), {"OMP_NUM_THREADS": "3"})
    try:
        workers = {name: fleet.worker("cpu", extra_args=("--cpus", ",".join(map(str, c))))
                   for name, c in wanted.items()}
        for name, w in workers.items():
            found = wait_for(lambda w=w: POOL_LINE.search(w.log_path.read_text(errors="replace")), timeout=120)
            pid, shown, torch_threads = int(found[1]), found[2], int(found[3])
            parent = psutil.Process(w.pid)
            assert pid in {p.pid for p in parent.children(recursive=True)}, (name, pid)
            pool = psutil.Process(pid)
            assert parent.cpu_affinity() == wanted[name] and pool.cpu_affinity() == wanted[name], name
            assert parse_cpus(shown) == wanted[name]  # what the pool process read back itself
            assert torch_threads == len(wanted[name]), found[0]
    finally:
        fleet.stop()


def test_a_core_the_worker_cannot_use_is_refused_before_it_starts() -> None:
    beyond = max(os.sched_getaffinity(0)) + 1
    done = subprocess.run([sys.executable, "-m", "workers.cli", "worker", "--cpus", f"0,{beyond}"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "QPIPE_BROKER_URL": ""})
    assert done.returncode == 2, done
    assert f"core(s) {beyond} are not available" in done.stderr and "choose among those" in done.stderr, done.stderr
    with pytest.raises(ValueError, match="not a core number or a range"):
        parse_cpus("first")
    assert parse_cpus("0-2,5", usable=range(8)) == [0, 1, 2, 5]
