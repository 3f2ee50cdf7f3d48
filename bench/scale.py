"""Horizontal scaling: what a second cpu-queue worker does to the fan-out stages, each worker
pinned to a core of its own as a second machine would be, all on loopback.

The fan-out stages are those the plan runs side by side once the fp32 model is trained: each
variant's branch (calibrate, quantize, benchmark), the fp32 baseline's benchmark and the parts of
a sensitivity analysis. The stages before them (ingest, and the fine-tune on the gpu-queue
worker) and after them (the report) run one at a time however many workers there are.

Pinning (the default): ``EmbeddedCluster(pin_cpu_workers=True)``, so cpu worker i runs on core i
of this process's cores with one torch thread (``qpipe worker --cpus``). Unpinned (``--no-pin``),
every worker runs torch with one thread per core of the machine, and two workers on two cores
compete for both. The gpu-queue worker every run has is not pinned: it trains before the
fan-out and is idle during it.

Each configuration (1, then 2 cpu workers) gets a fresh private Valkey and a fresh ``file://``
store, so nothing is served from the other's cache, and runs:

* by default, one pipeline with a wide fan-out: four static variants (minmax with ``fallback:
  auto``, whose sensitivity analysis fans out in ``--parts`` parts, histogram, percentile, mse),
  a dynamic one and the fp32 baseline, each benchmarked on ``--runtimes``; ``--engines`` adds
  the NNCF and ONNX Runtime engines' variants;
* ``--sensitivity``: one pipeline whose only variant is minmax with ``fallback: auto``: the fan-out
  is its sensitivity parts alone;
* ``--batch``: ``--pipelines`` small pipelines submitted at once (the wall time of the batch only).

Figures, from the stages' start and finish times in the run's status:

* ``fan_out_span``: the first fan-out stage's start to the last one's finish; ``fan_out_work``:
  their durations summed; ``pipeline_span``: the first stage's start to the last one's finish;
  ``serial_span``: the pipeline's span less the fan-out's; ``critical_path``: the longest chain of
  fan-out stages through the plan's dependencies, at their measured durations;
* ``speedup``: 1 worker's span over 2 workers', for the fan-out and for the whole pipeline;
  ``efficiency``: the speedup over the number of workers (2);
* ``projection`` for 4, 8 and 16 workers, from the 1-worker run: Amdahl's law with the serial
  fraction f = serial_span / pipeline_span, speedup = 1 / (f + (1 - f) / N); and
  ``bounded_by_plan``, which also respects the plan: the fan-out cannot take less than its
  critical path nor less than its work over N, so speedup <= pipeline_span /
  (serial_span + max(fan_out_work / N, critical_path)).

``work_growth`` is the 2-worker run's fan-out work over the 1-worker run's: above 1 the stages
themselves ran slower side by side (shared caches and memory, or other processes), which no
scheduling wins back.

``other_load`` is the share of the CPUs other processes used during each configuration
(``pipeline.bench.machine_busy_s``): pinned workers assume their cores are theirs, and two
workers on two cores lose more to a busy machine than one does. ``--rounds N`` measures both
configurations N times, alternating, and shows the round whose busier configuration saw the
least such load (every round's fan-out speedup and loads are listed).

It prints one JSON object; it never fails on a missed speedup.

    python -m bench.scale                       # fan-out of one pipeline, 1 vs 2 pinned workers
    python -m bench.scale --engines --parts 4
    python -m bench.scale --sensitivity --parts 4
    python -m bench.scale --batch --pipelines 6 --no-pin
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.bench import machine_busy_s
from workers.client import Client
from workers.embedded import EmbeddedCluster

SERIAL_STAGES = frozenset({"ingest", "finetune", "qat", "report"})  # never side by side within one run
WORKERS = (1, 2)
PROJECT_TO = (4, 8, 16)


def _base(name: str, size: int, runtimes: list[str], seed: int = 0) -> dict:
    return {
        "name": name,
        "seed": seed,
        "data": {"source": "builtin:digits", "image_size": size, "calib_size": 64},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "benchmark": {"batch_sizes": [1, 16], "iterations": 10, "warmup": 2, "accuracy_budget": 1.0,
                      "runtimes": runtimes},
    }


def fan_out_spec(parts: int, size: int, runtimes: list[str], engines: bool) -> dict:
    variants = [{"name": "ptq-minmax", "method": "static", "observer": "minmax", "fallback": "auto"},
                {"name": "ptq-histogram", "method": "static", "observer": "histogram"},
                {"name": "ptq-percentile", "method": "static", "observer": "percentile"},
                {"name": "ptq-mse", "method": "static", "observer": "mse"},
                {"name": "dynamic", "method": "dynamic"}]
    if engines:
        variants += [{"name": "nncf", "method": "static", "engine": "nncf"},
                     {"name": "ort-static", "method": "static", "engine": "onnxruntime"}]
    return {**_base("scale-fan-out", size, runtimes),
            "quantize": {"sensitivity_parts": parts, "variants": variants}}


def sensitivity_spec(parts: int, size: int, runtimes: list[str]) -> dict:
    spec = _base("scale-sensitivity", size, runtimes)
    spec["benchmark"].update(batch_sizes=[1], iterations=5, warmup=1)
    return {**spec, "quantize": {"sensitivity_parts": parts,
                                 "variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax",
                                               "fallback": "auto"}]}}


def batch_spec(i: int, size: int) -> dict:
    return {**_base(f"scale-{i:03d}", size, ["torchscript"], seed=i),  # as measured before runtimes existed
            "quantize": {"variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"},
                                      {"name": "ptq-histogram", "method": "static", "observer": "histogram"},
                                      {"name": "dynamic", "method": "dynamic"}]}}


class Load:
    """The share of the machine's CPUs that processes other than the cluster's used meanwhile:
    busy CPU time since start, less what this process and its descendants (the broker, the
    workers, their pool processes, and those pool processes' reaped predecessors) used."""

    def __init__(self) -> None:
        self.busy, self.wall, self.own = machine_busy_s(), time.monotonic(), self._own()

    @staticmethod
    def _own() -> float:
        import psutil

        total = 0.0
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:  # ended while we looked
                continue
            total += t.user + t.system + (t.children_user + t.children_system if p is not me else 0.0)
        return total

    def share(self) -> float | None:
        busy, wall = machine_busy_s(), time.monotonic() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            return None
        return round(max(0.0, (busy - self.busy - (self._own() - self.own)) / (wall * (os.cpu_count() or 1))), 3)


def critical_path(plan: list[dict], durations: dict[str, float]) -> float:
    """The longest chain of the nodes in ``durations`` through the plan's dependencies (the plan
    lists every node after its inputs), each at its duration."""
    longest: dict[str, float] = {}
    for node in plan:
        if node["id"] in durations:
            before = [longest[dep["id"]] for dep in node["inputs"].values() if dep["id"] in longest]
            longest[node["id"]] = durations[node["id"]] + max(before, default=0.0)
    return max(longest.values(), default=0.0)


def spans(summary: dict, plan: list[dict], fan_out: set[str] | None) -> dict[str, Any]:
    """The figures of the module docstring for one run; ``fan_out``: the stage names that fan
    out (default: every stage but ``SERIAL_STAGES``)."""
    rows = [s for s in summary["stages"] if s.get("started") is not None and s.get("finished") is not None]
    wide = [s for s in rows if (s["stage"] in fan_out if fan_out else s["stage"] not in SERIAL_STAGES)]
    if not wide:
        raise RuntimeError(f"no fan-out stage finished in run {summary.get('run_id')} ({summary.get('status')})")
    durations = {s["id"]: s["finished"] - s["started"] for s in wide}
    pipeline_span = max(s["finished"] for s in rows) - min(s["started"] for s in rows)
    fan_out_span = max(s["finished"] for s in wide) - min(s["started"] for s in wide)
    return {"pipeline_span_s": round(pipeline_span, 2), "fan_out_span_s": round(fan_out_span, 2),
            "serial_span_s": round(pipeline_span - fan_out_span, 2),
            "fan_out_work_s": round(sum(durations.values()), 2),
            "critical_path_s": round(critical_path(plan, durations), 2),
            "longest_fan_out_stage_s": round(max(durations.values()), 2), "fan_out_stages": len(wide),
            "fan_out_stages_per_worker": dict(Counter(s["worker"] for s in wide)),
            "fan_out_seconds_by_stage": {k: round(sum(durations[s["id"]] for s in wide if s["stage"] == k), 1)
                                         for k in sorted({s["stage"] for s in wide})}}


def run_one(spec: dict, cpu_workers: int, pin: bool, fan_out: set[str] | None, timeout: float) -> dict:
    from pipeline.plan import build_plan
    from pipeline.sources import prepare_sources
    from pipeline.spec import load_spec
    from pipeline.store import open_store

    with tempfile.TemporaryDirectory(prefix="qpipe-scale-") as tmp:
        with EmbeddedCluster(home=Path(tmp), cpu_workers=cpu_workers, pin_cpu_workers=pin) as cluster:
            load = Load()
            t0 = time.monotonic()
            summary = Client(cluster.broker, cluster.store).submit(spec).wait(timeout=timeout, poll=0.5)
            wall = time.monotonic() - t0
            other = load.share()
            parsed = load_spec(spec)
            plan = build_plan(parsed, prepare_sources(parsed, open_store(cluster.store)))
    return {"cpu_workers": cpu_workers, "status": summary["status"], "wall_s": round(wall, 1),
            "other_load": other, **spans(summary, plan, fan_out)}


def compare(runs: list[dict]) -> dict[str, Any]:
    """Speedup and efficiency of the 2-worker run over the 1-worker one, and the projection."""
    one, two = runs
    n = two["cpu_workers"] / one["cpu_workers"]
    fan = one["fan_out_span_s"] / two["fan_out_span_s"]
    whole = one["pipeline_span_s"] / two["pipeline_span_s"]
    serial, total = one["serial_span_s"], one["pipeline_span_s"]
    f = serial / total
    projection = {}
    for workers in PROJECT_TO:
        fan_out_time = max(one["fan_out_work_s"] / workers, one["critical_path_s"])
        projection[str(workers)] = {"amdahl_speedup": round(1 / (f + (1 - f) / workers), 2),
                                    "bounded_by_plan": round(total / (serial + fan_out_time), 2)}
    return {"fan_out": {"speedup": round(fan, 2), "efficiency": round(fan / n, 2),
                        "work_growth": round(two["fan_out_work_s"] / one["fan_out_work_s"], 2)},
            "pipeline": {"speedup": round(whole, 2), "efficiency": round(whole / n, 2)},
            "serial_fraction": round(f, 3), "projection": projection}


def quietest(rounds: list[list[dict]]) -> int:
    """The round whose busier configuration saw the least load from other processes."""
    return min(range(len(rounds)), key=lambda r: max(run.get("other_load") or 0.0 for run in rounds[r]))


def run_batch(cpu_workers: int, n: int, size: int, pin: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="qpipe-scale-") as tmp:
        with EmbeddedCluster(home=Path(tmp), cpu_workers=cpu_workers, pin_cpu_workers=pin) as cluster:
            client = Client(cluster.broker, cluster.store)
            load = Load()
            t0 = time.monotonic()
            handles = [client.submit(batch_spec(i, size)) for i in range(n)]
            summaries = [h.wait(timeout=timeout, poll=0.5) for h in handles]
            wall = time.monotonic() - t0
            other = load.share()
    per_worker = Counter(s["worker"] for r in summaries for s in r["stages"] if s["stage"] != "finetune")
    return {"cpu_workers": cpu_workers, "wall_seconds": round(wall, 1), "other_load": other,
            "succeeded": sum(r["status"] == "SUCCESS" for r in summaries), "stages_per_worker": dict(per_worker)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sensitivity", action="store_true", help="the fan-out of one sensitivity analysis only")
    mode.add_argument("--batch", action="store_true", help="the wall time of --pipelines pipelines at once")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="each cpu worker on a core of its own with one torch thread (qpipe worker --cpus)")
    ap.add_argument("--parts", type=int, default=4, help="sensitivity parts")
    ap.add_argument("--engines", action="store_true", help="add the NNCF and ONNX Runtime engines' variants")
    ap.add_argument("--runtimes", default="torchscript,onnxruntime,openvino", help="the benchmarks' runtimes")
    ap.add_argument("--pipelines", type=int, default=6, help="--batch: pipelines per configuration")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure 1 then 2 workers this many times; the figures shown are the quietest round's")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    cores = len(os.sched_getaffinity(0))
    head = {"image_size": args.image_size, "cores": cores, "pinned": args.pin}
    if args.pin and cores < max(WORKERS):
        head["warning"] = f"{cores} core(s): pinned workers share cores (round robin)"
    if args.batch:
        runs = [run_batch(k, args.pipelines, args.image_size, args.pin, args.timeout) for k in WORKERS]
        print(json.dumps({"mode": "batch", "pipelines": args.pipelines, **head, "runs": runs,
                          "speedup": round(runs[0]["wall_seconds"] / runs[1]["wall_seconds"], 2)}, indent=2))
        return
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if args.sensitivity:
        spec, fan_out, mode_name = sensitivity_spec(args.parts, args.image_size, runtimes), {"sensitivity"}, \
            "sensitivity"
    else:
        spec, fan_out, mode_name = fan_out_spec(args.parts, args.image_size, runtimes, args.engines), None, "fan-out"
    rounds = [[run_one(spec, k, args.pin, fan_out, args.timeout) for k in WORKERS] for _ in range(args.rounds)]
    per_round = [{**compare(runs), "other_load": [run["other_load"] for run in runs]} for runs in rounds]
    best = quietest(rounds)
    print(json.dumps({"mode": mode_name, "parts": args.parts, "runtimes": runtimes, "engines": args.engines, **head,
                      "round_shown": best, **compare(rounds[best]), "target": {"fan_out_speedup_min": 1.8},
                      "fan_out_speedup_per_round": [r["fan_out"]["speedup"] for r in per_round],
                      "other_load_per_round": [r["other_load"] for r in per_round],
                      "variants": [v["name"] for v in spec["quantize"]["variants"]], "runs": rounds[best],
                      **({"other_rounds": [runs for r, runs in enumerate(rounds) if r != best]} if args.rounds > 1
                         else {})}, indent=2))


if __name__ == "__main__":
    main()
