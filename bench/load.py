"""Load: N small pipelines submitted at once against 2 workers (one cpu-queue, one gpu-queue
worker, the embedded default's shape), all on loopback.

Prints one JSON object: how many succeeded, whether any stage was lost, how many times each
content key was computed, throughput (pipelines per minute), p50/p95 seconds from submit to done,
and the resident memory of each long-lived worker (process tree) sampled before, during and after
the batch.

    python -m bench.load                 # 50 pipelines, each with its own fine-tune
    python -m bench.load --shared        # 50 pipelines that share their stages (see shared_spec)
    python -m bench.load --pipelines 6 --shared --cpu-concurrency 2   # what tests/test_load.py runs

A pipeline here: digits at 16x16, ResNet18, one epoch, one static variant, so that 50 of them fit
in a few minutes on 2 cores. By default the pipelines differ by learning rate, so each has its own
fine-tune, calibration, quantization and benchmarks; they share the ingest stage (cached). With
``--shared`` they share everything up to the fine-tune and much after it (``shared_spec``), so the
same content keys are wanted by several pipelines at once: what the stage locks and the cache are
for.

Computations are counted from the workers' logs: a stage logs ``computed stage S key K`` only when
its function ran to the end (``workers/tasks.py``), never on a cache hit. ``executions_per_key``
maps a number of computations to how many content keys had it: ``{"1": N}`` means none was
computed twice and none was reused without having been computed.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from workers.client import Client
from workers.embedded import EmbeddedCluster


def small_spec(i: int) -> dict:
    return {
        "name": f"load-{i:03d}",
        "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": round(0.01 + 0.0001 * i, 6)},
        "quantize": {"variants": [{"name": "ptq", "method": "static", "observer": "minmax"}]},
        "benchmark": {"batch_sizes": [1], "iterations": 3, "warmup": 1, "accuracy_budget": 1.0,
                      "runtimes": ["torchscript"]},  # orchestration, not the ONNX runtimes
    }


# the pipelines of a shared batch differ only after the fine-tune, in one of these ways (by i % 3):
# what is quantized (the static variant's observer) and how it is benchmarked (iterations)
SHARED_TAILS = ({"observer": "minmax", "iterations": 3}, {"observer": "histogram", "iterations": 3},
                {"observer": "minmax", "iterations": 4})
COMPUTED = re.compile(r"computed stage (\S+) key (\S+)")


def shared_spec(i: int) -> dict:
    """Pipeline i of a batch that shares its stages: one ingest, model and fine-tune for all;
    pipelines i and i + 3 are the same spec; i % 3 picks what follows the fine-tune
    (``SHARED_TAILS``), so pipelines 0 and 1 share the fp32 benchmark, 0 and 2 the calibration
    and quantization. Nothing is shared with the warm-up run (small_spec), so every pipeline's
    ingest is wanted at the moment of submission, by as many workers as are free."""
    tail = SHARED_TAILS[i % len(SHARED_TAILS)]
    spec = small_spec(0)
    spec["name"] = f"load-shared-{i % len(SHARED_TAILS)}"
    spec["data"]["calib_size"] = 48  # small_spec's is 32: an ingest of the batch's own
    spec["finetune"]["lr"] = 0.005  # no small_spec(i) has it
    spec["quantize"]["variants"][0]["observer"] = tail["observer"]
    spec["benchmark"]["iterations"] = tail["iterations"]
    return spec


def computations(log_paths: list[Path]) -> collections.Counter:
    """How many times each (stage, content key) was computed, from the workers' log files."""
    counts: collections.Counter = collections.Counter()
    for path in log_paths:
        counts.update(COMPUTED.findall(path.read_text(errors="replace")))
    return counts


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:  # exited meanwhile
            continue
    return total / 2**20


def run_load(n: int, cluster: EmbeddedCluster, timeout: float = 3600, shared: bool = False) -> dict:
    spec_of = shared_spec if shared else small_spec
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
    handles = [(client.submit(spec_of(i)), time.monotonic()) for i in range(n)]
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
    # nothing lost: every stage of every run ended; nothing computed twice: each content key the
    # runs used was computed exactly once in the cluster's life (the warm-up's ingest included),
    # counted from the compute path's log line, whichever run's status says "done" or "cached"
    users: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    unfinished = 0
    for s in summaries:
        for st in s["stages"]:
            if st["stage"] != "report":  # not cached: every run makes its own report
                users[(st["stage"], st["key"])].add(s["run_id"])
            if st["state"] not in ("done", "cached"):
                unfinished += 1
    done = computations([w.log_path for w in cluster.workers])
    per_key = collections.Counter(str(done[k]) for k in users)
    waits = sum(p.read_text(errors="replace").count("the same stage is running elsewhere; waiting")
                for p in (w.log_path for w in cluster.workers))
    ok = sum(1 for s in summaries if s["status"] == "SUCCESS")
    lat = sorted(latencies)
    return {
        "pipelines": n,
        "succeeded": ok,
        "lost": n - len(summaries),
        "stages_not_finished": unfinished,
        "content_keys": len(users),
        "shared_keys": sum(1 for runs in users.values() if len(runs) > 1),
        "executions_per_key": dict(sorted(per_key.items())),
        "computed_twice": sum(c for times, c in per_key.items() if int(times) > 1),
        "lock_waits": waits,
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
    ap.add_argument("--shared", action="store_true", help="pipelines that share their stages (shared_spec)")
    ap.add_argument("--cpu-concurrency", type=int, default=1, help="pool processes of the cpu worker")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qpipe-load-") as tmp:
        with EmbeddedCluster(home=Path(tmp), cpu_concurrency=args.cpu_concurrency) as cluster:
            result = run_load(args.pipelines, cluster, args.timeout, shared=args.shared)
    result["cores"] = len(__import__("os").sched_getaffinity(0))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
