"""Load: N small pipelines submitted at once against 2 workers (one cpu-queue, one gpu-queue
worker, the embedded default's shape), all on loopback.

Prints one JSON object: how many succeeded, whether any stage was lost or computed twice,
throughput (pipelines per minute), p50/p95 seconds from submit to done, and the resident memory
of each long-lived worker (process tree) sampled before, during and after the batch.

    python bench/load.py               # 50 pipelines
    python bench/load.py --pipelines 6 # what the test suite runs (tests/test_load.py)

A pipeline here: digits at 16x16, ResNet18, one epoch, one static variant, so that 50 of them fit
in a few minutes on 2 cores. The pipelines differ by learning rate, so each has its own
fine-tune, calibration, quantization and benchmarks; they share the ingest stage (cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.client import Client  # noqa: E402
from workers.embedded import EmbeddedCluster  # noqa: E402


def small_spec(i: int) -> dict:
    return {
        "name": f"load-{i:03d}",
        "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": round(0.01 + 0.0001 * i, 6)},
        "quantize": {"variants": [{"name": "ptq", "method": "static", "observer": "minmax"}]},
        "benchmark": {"batch_sizes": [1], "iterations": 3, "warmup": 1, "accuracy_budget": 1.0,
                      "runtimes": ["torchscript"]},  # orchestration, not the ONNX runtimes
    }


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MB."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        out = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout
        todo += [int(x) for x in out.split()]
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def run_load(n: int, cluster: EmbeddedCluster, timeout: float = 3600) -> dict:
    client = Client(cluster.broker, cluster.store)
    # one warm-up run, so every worker has imported torch before the memory baseline
    client.submit({**small_spec(999), "name": "load-warmup"}).wait(timeout=600)
    rss_before = {w.node: tree_rss_mb(w.pid) for w in cluster.workers}
    peak = dict(rss_before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            for w in cluster.workers:
                peak[w.node] = max(peak[w.node], tree_rss_mb(w.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    handles = [(client.submit(small_spec(i)), time.monotonic()) for i in range(n)]
    submitted = time.monotonic() - t0
    latencies, summaries = [], []
    pending = list(handles)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for item in list(pending):
            handle, t_submit = item
            if handle.done():
                latencies.append(time.monotonic() - t_submit)
                summaries.append(handle.status())
                pending.remove(item)
        time.sleep(0.5)
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    rss_after = {w.node: tree_rss_mb(w.pid) for w in cluster.workers}
    # nothing lost, nothing computed twice: every stage of every run ended exactly once, and each
    # content key was computed ("done") by one run only; the others found it ("cached")
    computed: dict[str, int] = {}
    unfinished = 0
    for s in summaries:
        for st in s["stages"]:
            if st["state"] == "done" and st["stage"] != "report":
                computed[st["key"]] = computed.get(st["key"], 0) + 1
            elif st["state"] not in ("done", "cached"):
                unfinished += 1
    twice = sorted(k for k, c in computed.items() if c > 1)
    ok = sum(1 for s in summaries if s["status"] == "SUCCESS")
    lat = sorted(latencies)
    return {
        "pipelines": n,
        "succeeded": ok,
        "lost": n - len(summaries),
        "stages_not_finished": unfinished,
        "computed_twice": len(twice),
        "submit_seconds": round(submitted, 2),
        "wall_seconds": round(wall, 1),
        "throughput_per_min": round(60 * ok / wall, 2),
        "latency_s_p50": round(statistics.median(lat), 1) if lat else None,
        "latency_s_p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1) if lat else None,
        "worker_rss_mb": {node: {"before": round(rss_before[node]), "peak": round(peak[node]),
                                 "after": round(rss_after[node])} for node in rss_before},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qpipe-load-") as tmp:
        with EmbeddedCluster(home=Path(tmp)) as cluster:
            result = run_load(args.pipelines, cluster, args.timeout)
    result["cores"] = len(__import__("os").sched_getaffinity(0))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
