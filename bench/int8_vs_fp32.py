"""int8 vs fp32 on CPU: latency and artifact size of the models qpipe deploys.

What it measures
    A torchvision classifier (ResNet18 by default, random weights from a fixed seed, 1000
    classes, 224x224 input) in up to four forms, at each batch size (1 and 32 by default):

    * ``fp32_eager``        the nn.Module itself, in eval mode under ``torch.no_grad``;
    * ``fp32_torchscript``  traced + frozen with ``pipeline.quant.export_torchscript`` and loaded
                            back with ``pipeline.quant.load_torchscript`` (``torch.jit.load``);
    * ``int8_static``       static post-training quantization through qpipe's engine
                            (``prepare_static`` -> a few random calibration batches ->
                            ``observer_state`` -> ``convert_static``; per-channel symmetric qint8
                            weights, x86 engine), exported with ``export_torchscript`` and loaded
                            back with ``torch.jit.load``: the artifact path qpipe deploys;
    * ``int8_dynamic``      (``--dynamic``, on by default) ``quantize_dynamic`` (int8 Linear
                            only), same export/load path.

    Latency is p50/p95 in ms of one forward pass (``pipeline.bench.measure_latency``) with
    ``--threads`` intra-op threads. Size is the serialized file's byte count (TorchScript for
    every form; the fp32 state_dict size is given too).

How
    Measurements are interleaved to be robust to a noisy machine: ``--rounds`` rounds, each
    measuring every form at every batch size, in an order rotated from round to round. The
    reported p50/p95 are medians over rounds of each round's p50/p95, and each speedup is the
    median over rounds of the ratio measured *within* the round (both forms ran seconds apart).
    A measurement stops after ``--iterations`` timed calls or ``--max-seconds``, whichever
    comes first (at least 3 samples), after ``--warmup`` untimed calls.

    The machine may be shared: each measurement records ``other_load``, the share of the CPUs
    that other processes used meanwhile (from /proc/stat). A round where it reaches
    ``--quiet-threshold`` is noisy (a 2-thread OpenMP process sharing 2 cores with anything busy
    can slow down many times over); ``noise`` gives the per-round loads, the speedup over the
    quiet rounds only, and a warning when most rounds were noisy. ``target_met`` still uses the
    median over all rounds.

    As a sanity check the int8 artifact's logits are compared with fp32 eager ones on a fresh
    random batch (cosine similarity and top-1 agreement); random weights make top-1 agreement a
    weak signal, so it is reported, never judged.

Output
    One JSON object on stdout (progress goes to stderr). ``target_met`` is true when the int8
    speedup over fp32 eager at batch 1 is >= ``--target-speedup`` (4.0) and the int8/fp32 size
    ratio is <= ``--target-size-ratio`` (0.27). The script exits non-zero only on errors, never
    because a target was missed.

    .venv/bin/python -m bench.int8_vs_fp32                       # ~2 min on 2 quiet cores
    .venv/bin/python -m bench.int8_vs_fp32 --rounds 3 --no-dynamic --batch-sizes 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import quant
from pipeline.bench import machine_busy_s, measure_latency, threads
from pipeline.models import build_model

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def log(msg: str) -> None:
    print(f"[int8_vs_fp32 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_info() -> dict[str, Any]:
    """CPU model name and the SIMD flags that matter for int8 kernels, from /proc/cpuinfo."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown"
    return {"model": model, "int8_flags": [f for f in CPU_FLAGS if f in flags], "logical_cpus": os.cpu_count()}


def add_timing_args(p: argparse.ArgumentParser, *, warmup: int) -> None:
    """The latency-measurement options shared with bench/peers.py."""
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are taken across them")
    p.add_argument("--iterations", type=int, default=50, help="timed calls per measurement (at most)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls before each measurement")
    p.add_argument("--max-seconds", type=float, default=2.0, help="time cap of one measurement")
    p.add_argument("--quiet-threshold", type=float, default=0.1,
                   help="a round counts as quiet when other processes used less than this share of the CPUs")


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,32") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="torchvision classification architecture")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 32], help="comma-separated")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (match the machine's cores)")
    p.add_argument("--backend", default="x86", choices=["x86", "qnnpack", "fbgemm", "onednn"],
                   help="quantized engine")
    p.add_argument("--observer", default="minmax", choices=list(quant.OBSERVERS))
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights instead of per-channel")
    p.add_argument("--calib-batches", type=int, default=4, help="random calibration batches")
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure dynamic quantization (int8 Linear only)")
    add_timing_args(p, warmup=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-speedup", type=float, default=4.0, help="int8 vs fp32 eager at batch 1")
    p.add_argument("--target-size-ratio", type=float, default=0.27, help="int8 / fp32 TorchScript bytes")
    p.add_argument("--workdir", type=Path, default=None, help="where artifacts go (a temp dir by default)")
    args = p.parse_args(argv)
    for name in ("num_classes", "image_size", "threads", "calib_batches", "calib_batch_size", "rounds",
                 "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.max_seconds <= 0:
        p.error("--warmup must be >= 0 and --max-seconds > 0")
    return args


def build_forms(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, Any]]:
    """The models to time, keyed by form name, and facts about them (sizes, layers, agreement)."""
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.num_classes).eval()
    example = (torch.zeros(1, 3, args.image_size, args.image_size),)
    gen = torch.Generator().manual_seed(args.seed + 1)
    facts: dict[str, Any] = {}

    fp32_sd = workdir / "fp32_state_dict.pt"
    torch.save(model.state_dict(), fp32_sd)
    t0 = time.perf_counter()
    fp32_ts = quant.export_torchscript(model, example, workdir / "fp32.ts")
    facts["export_s"] = {"fp32": round(time.perf_counter() - t0, 2)}

    log(f"calibrating {args.arch} on {args.calib_batches}x{args.calib_batch_size} random images, "
        f"{args.observer} observer, {'per-tensor' if args.per_tensor else 'per-channel'} weights, {args.backend}")
    t0 = time.perf_counter()
    observed = quant.prepare_static(model, example, observer=args.observer, per_channel=not args.per_tensor,
                                    backend=args.backend, arch=args.arch)
    with torch.no_grad():
        for _ in range(args.calib_batches):
            observed(torch.randn(args.calib_batch_size, 3, args.image_size, args.image_size, generator=gen))
    int8 = quant.convert_static(model, example, quant.observer_state(observed), observer=args.observer,
                                per_channel=not args.per_tensor, backend=args.backend, arch=args.arch)
    int8_layers, fp32_layers = quant.count_layers(quant.layer_table(int8))
    facts["quantize_s"] = {"int8_static": round(time.perf_counter() - t0, 2)}
    facts["layers"] = {"int8_static": {"int8": int8_layers, "fp32": fp32_layers}}
    t0 = time.perf_counter()
    int8_ts = quant.export_torchscript(int8, example, workdir / "int8_static.ts")
    facts["export_s"]["int8_static"] = round(time.perf_counter() - t0, 2)
    del observed, int8

    files = {"fp32_torchscript": fp32_ts, "int8_static": int8_ts}
    if args.dynamic:
        t0 = time.perf_counter()
        dyn = quant.quantize_dynamic(model, example, backend=args.backend, arch=args.arch)
        facts["quantize_s"]["int8_dynamic"] = round(time.perf_counter() - t0, 2)
        d_int8, d_fp32 = quant.count_layers(quant.layer_table(dyn))
        facts["layers"]["int8_dynamic"] = {"int8": d_int8, "fp32": d_fp32}
        files["int8_dynamic"] = quant.export_torchscript(dyn, example, workdir / "int8_dynamic.ts")
        del dyn

    facts["size_bytes"] = {"fp32_state_dict": fp32_sd.stat().st_size,
                           **{name: path.stat().st_size for name, path in files.items()}}
    # Deployed artifacts are loaded the way a user (and the benchmark stage) loads them.
    quant.set_engine(args.backend)
    forms: dict[str, Callable] = {"fp32_eager": model}
    for name, path in files.items():
        forms[name] = quant.load_torchscript(path)  # torch.jit.load(path, map_location="cpu")

    x = torch.randn(8, 3, args.image_size, args.image_size, generator=gen)
    with torch.no_grad():
        ref = model(x)
        agreement = {}
        for name in ("int8_static", "int8_dynamic"):
            if name in forms:
                out = forms[name](x)
                agreement[name] = {
                    "cosine": round(torch.nn.functional.cosine_similarity(out, ref, dim=1).mean().item(), 4),
                    "top1_agreement": round((out.argmax(1) == ref.argmax(1)).float().mean().item(), 4),
                    "images": x.shape[0],
                }
    facts["agreement_with_fp32_eager"] = agreement
    return forms, facts


def measure(model: Callable, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """``measure_latency`` plus ``other_load``: the share of the machine's CPU capacity that
    other processes used meanwhile (0 = quiet, 1 = every core busy with something else)."""
    busy0, t0, own0 = machine_busy_s(), time.perf_counter(), time.process_time()
    res = measure_latency(model, x, warmup=args.warmup, iterations=args.iterations, max_seconds=args.max_seconds)
    busy1, wall, own = machine_busy_s(), time.perf_counter() - t0, time.process_time() - own0
    if busy0 is not None and busy1 is not None and wall > 0:
        res["other_load"] = max(0.0, (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)))
    return res


def interleaved(forms: dict[str, Callable], args: argparse.Namespace) -> dict[int, dict[str, list[dict]]]:
    """``rounds[batch][form]`` = one ``measure_latency`` result per round."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    inputs = {bs: torch.randn(bs, 3, args.image_size, args.image_size, generator=gen) for bs in args.batch_sizes}
    results: dict[int, dict[str, list[dict]]] = {bs: {f: [] for f in forms} for bs in args.batch_sizes}
    names = list(forms)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no form always goes first
        for bs in args.batch_sizes:
            for name in order:
                results[bs][name].append(measure(forms[name], inputs[bs], args))
            line = ", ".join(f"{n} {results[bs][n][-1]['p50_ms']:.2f}" for n in names)
            load = round_load(results[bs], -1)
            log(f"round {r + 1}/{args.rounds} batch {bs}: p50 ms {line}"
                + (f" (other processes: {load:.0%} of the CPUs)" if load is not None else ""))
    return results


def round_load(per_form: dict[str, list[dict]], r: int) -> float | None:
    """The highest ``other_load`` among the forms' measurements in round ``r``."""
    loads = [rs[r]["other_load"] for rs in per_form.values() if "other_load" in rs[r]]
    return max(loads) if loads else None


def median_ratio(num: list[dict], den: list[dict], rounds: list[int] | None = None) -> float | None:
    """Median over rounds of num_p50 / den_p50, each pair measured in the same round."""
    idx = range(len(num)) if rounds is None else rounds
    ratios = [num[i]["p50_ms"] / den[i]["p50_ms"] for i in idx]
    return statistics.median(ratios) if ratios else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
    started = time.perf_counter()
    import torchvision

    with threads(args.threads), tempfile.TemporaryDirectory(prefix="qpipe-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        forms, facts = build_forms(args, workdir)
        log(f"sizes: {facts['size_bytes']}; timing {list(forms)} at batch sizes {args.batch_sizes}, "
            f"{args.threads} thread(s), {args.rounds} rounds")
        results = interleaved(forms, args)
        thread_count = torch.get_num_threads()

    latency = {
        str(bs): {
            name: {"p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
                   "p95_ms": round(statistics.median(r["p95_ms"] for r in rs), 3),
                   "p50_ms_per_round": [round(r["p50_ms"], 3) for r in rs],
                   "other_load_per_round": [round(r["other_load"], 3) if "other_load" in r else None for r in rs],
                   "samples": sum(r["samples"] for r in rs)}
            for name, rs in per_form.items()
        }
        for bs, per_form in results.items()
    }
    speedups: dict[str, dict[str, float]] = {}
    for name in forms:
        if name == "fp32_eager":
            continue
        speedups[f"{name}_vs_fp32_eager"] = {
            str(bs): round(median_ratio(results[bs]["fp32_eager"], results[bs][name]), 3) for bs in results}
        if name.startswith("int8"):
            speedups[f"{name}_vs_fp32_torchscript"] = {
                str(bs): round(median_ratio(results[bs]["fp32_torchscript"], results[bs][name]), 3)
                for bs in results}
    loads = {bs: [round_load(per_form, r) for r in range(args.rounds)] for bs, per_form in results.items()}
    quiet = {bs: [r for r, load in enumerate(ls) if load is not None and load < args.quiet_threshold]
             for bs, ls in loads.items()}
    quiet_speedup = {}
    for bs in results:
        q = median_ratio(results[bs]["fp32_eager"], results[bs]["int8_static"], quiet[bs])
        quiet_speedup[str(bs)] = round(q, 3) if q is not None else None
    noise = {"quiet_threshold": args.quiet_threshold,
             "other_load_per_round": {str(bs): [round(x, 3) if x is not None else None for x in ls]
                                      for bs, ls in loads.items()},
             "quiet_rounds": {str(bs): len(rs) for bs, rs in quiet.items()},
             "speedup_int8_vs_fp32_eager_quiet_rounds": quiet_speedup}
    if any(len(rs) < (args.rounds + 1) // 2 for rs in quiet.values()):
        noise["warning"] = ("other processes were busy during most rounds: latencies and speedups are unreliable "
                            "(OpenMP threads compete for the same cores); rerun on a quiet machine")
    sizes = facts["size_bytes"]
    size_ratio = sizes["int8_static"] / sizes["fp32_torchscript"]
    speedup_b1 = speedups["int8_static_vs_fp32_eager"].get("1")
    speed_ok = speedup_b1 is not None and speedup_b1 >= args.target_speedup
    size_ok = size_ratio <= args.target_size_ratio

    report = {
        "benchmark": "int8_vs_fp32",
        "arch": args.arch,
        "num_classes": args.num_classes,
        "image_size": args.image_size,
        "batch_sizes": args.batch_sizes,
        "weights": f"random (seed {args.seed})",
        "quantization": {"method": "static PTQ", "engine": quant.ENGINE, "backend": args.backend,
                         "observer": args.observer, "per_channel": not args.per_tensor,
                         "calibration": f"{args.calib_batches} random batches of {args.calib_batch_size}",
                         "artifact": "TorchScript (trace + freeze), loaded with torch.jit.load"},
        "speedup_int8_vs_fp32_eager": speedups["int8_static_vs_fp32_eager"],
        "size_ratio_int8_vs_fp32": round(size_ratio, 4),
        "targets": {"speedup_batch1_min": args.target_speedup, "size_ratio_max": args.target_size_ratio,
                    "speedup_met": speed_ok, "size_met": size_ok},
        "target_met": bool(speed_ok and size_ok),
        "noise": noise,
        "speedups": speedups,
        "latency_ms": latency,
        "size_bytes": sizes,
        "size_ratios": {name: round(sizes[name] / sizes["fp32_torchscript"], 4)
                        for name in sizes if name != "fp32_torchscript"},
        "layers": facts["layers"],
        "agreement_with_fp32_eager": facts["agreement_with_fp32_eager"],
        "prepare_s": {"quantize": facts["quantize_s"], "export": facts["export_s"]},
        "method": {"rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
                   "max_seconds": args.max_seconds,
                   "statistic": "median over interleaved rounds of per-round p50/p95; speedups are medians "
                                "of per-round ratios"},
        "threads": thread_count,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if speedup_b1 is None:
        report["targets"]["note"] = "batch size 1 was not measured: the speed target cannot be met"
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
