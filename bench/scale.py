"""Horizontal scaling: the wall time of one batch of pipelines with 1 and then 2 cpu-queue
workers (plus the one gpu-queue worker every run has), all on loopback.

Each configuration gets a fresh private Valkey and a fresh ``file://`` store (nothing is served
from the cache of the other configuration) and runs the same batch: ``--pipelines`` small
pipelines submitted at once, each with its own fine-tune and four cpu-heavy branches (two static
observers, dynamic, plus the fp32 baseline's benchmark), so the cpu queue is the bottleneck.
``speedup`` = wall(1 cpu worker) / wall(2 cpu workers), measured in the same invocation.

It prints one JSON object; it never fails on a missed speedup. On a machine with C cores,
expect at most about C / (cores a stage uses) times: on 2 cores every worker process competes
for the same two cores, which the JSON's ``cores`` states.

    python -m bench.scale                 # 6 pipelines per configuration
    python -m bench.scale --pipelines 10

``--sensitivity`` measures the fan-out of one sensitivity analysis instead: one pipeline whose
minmax variant has ``fallback: auto`` with ``--parts`` parts (default 4), and the span from the
first part's start to the last part's end, with 1 and then 2 cpu-queue workers.

    python -m bench.scale --sensitivity --parts 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from workers.client import Client
from workers.embedded import EmbeddedCluster


def spec(i: int, size: int) -> dict:
    return {
        "name": f"scale-{i:03d}",
        "seed": i,
        "data": {"source": "builtin:digits", "image_size": size, "calib_size": 64},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "quantize": {"variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"},
                                  {"name": "ptq-histogram", "method": "static", "observer": "histogram"},
                                  {"name": "dynamic", "method": "dynamic"}]},
        "benchmark": {"batch_sizes": [1, 16], "iterations": 10, "warmup": 2, "accuracy_budget": 1.0,
                      "runtimes": ["torchscript"]},  # as measured before runtimes existed
    }


def run_batch(cpu_workers: int, n: int, size: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="qpipe-scale-") as tmp:
        with EmbeddedCluster(home=Path(tmp), cpu_workers=cpu_workers) as cluster:
            client = Client(cluster.broker, cluster.store)
            t0 = time.monotonic()
            handles = [client.submit(spec(i, size)) for i in range(n)]
            summaries = [h.wait(timeout=timeout, poll=0.5) for h in handles]
            wall = time.monotonic() - t0
    per_worker = Counter(s["worker"] for r in summaries for s in r["stages"] if s["stage"] != "finetune")
    return {"cpu_workers": cpu_workers, "wall_seconds": round(wall, 1),
            "succeeded": sum(r["status"] == "SUCCESS" for r in summaries),
            "stages_per_worker": dict(per_worker)}


def sensitivity_spec(parts: int, size: int) -> dict:
    return {
        "name": "scale-sensitivity",
        "data": {"source": "builtin:digits", "image_size": size, "calib_size": 64},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "quantize": {"sensitivity_parts": parts,
                     "variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax",
                                   "fallback": "auto"}]},
        "benchmark": {"batch_sizes": [1], "iterations": 5, "warmup": 1, "runtimes": ["torchscript"]},
    }


def run_sensitivity(cpu_workers: int, parts: int, size: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="qpipe-scale-") as tmp:
        with EmbeddedCluster(home=Path(tmp), cpu_workers=cpu_workers) as cluster:
            summary = Client(cluster.broker, cluster.store).submit(sensitivity_spec(parts, size)).wait(
                timeout=timeout, poll=0.5)
    rows = [s for s in summary["stages"] if s["stage"] == "sensitivity"]
    span = max(s["finished"] for s in rows) - min(s["started"] for s in rows)
    return {"cpu_workers": cpu_workers, "status": summary["status"], "sensitivity_span_seconds": round(span, 1),
            "part_seconds": [round(s["finished"] - s["started"], 1) for s in rows],
            "parts_per_worker": dict(Counter(s["worker"] for s in rows))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--sensitivity", action="store_true", help="time one sensitivity analysis's fan-out instead")
    ap.add_argument("--parts", type=int, default=4)
    args = ap.parse_args()
    if args.sensitivity:
        runs = [run_sensitivity(k, args.parts, args.image_size, args.timeout) for k in (1, 2)]
        print(json.dumps({"parts": args.parts, "image_size": args.image_size, "cores": len(os.sched_getaffinity(0)),
                          "runs": runs, "speedup": round(runs[0]["sensitivity_span_seconds"]
                                                         / runs[1]["sensitivity_span_seconds"], 2)}, indent=2))
        return
    runs = [run_batch(k, args.pipelines, args.image_size, args.timeout) for k in (1, 2)]
    print(json.dumps({"pipelines": args.pipelines, "image_size": args.image_size,
                      "cores": len(os.sched_getaffinity(0)), "runs": runs,
                      "speedup": round(runs[0]["wall_seconds"] / runs[1]["wall_seconds"], 2)}, indent=2))


if __name__ == "__main__":
    main()
