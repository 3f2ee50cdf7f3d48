"""How close to the limit: this machine's int8 peak in multiply-accumulates per second (MAC/s),
and what each served model achieves as a fraction of it.

Peak
    Stacks of ``--peak-layers`` int8 layers written as qpipe's exports write a layer (a
    QuantizeLinear -> DequantizeLinear pair on the activation, an int8 weight, per output
    channel, through a DequantizeLinear, then the float op), which the runtimes fuse into int8
    kernels:

    * ``conv``: 3x3 convolutions, ``--peak-width`` channels in and out on a
      ``--peak-extent`` x ``--peak-extent`` map, batch 1;
    * ``matmul``: MatMuls of a (4 x extent, 8 x width) activation by (8 x width, 8 x width)
      weights.

    A stack rather than one large layer: between its layers the runtimes requantize inside the
    kernel, so quantizing the float input and reordering the output, which a single layer spends
    most of its time on where the kernel itself is fast (AMX), are paid once per stack.

    Each graph is timed on ONNX Runtime and OpenVINO (``pipeline.runtimes``' runners) with each
    thread count of ``--peak-threads`` (default: 1 and every core this process may run on), for
    ``--seconds`` per measurement, in ``--rounds`` rounds. A measurement's rate is the graph's
    MACs (``count_macs``) over its fastest call; the peak at a thread count is the best rate of
    any graph on any runtime. The same graphs with float weights and no quantizers give the float
    peaks for reference: ``fp32`` (ONNX Runtime, and OpenVINO told INFERENCE_PRECISION_HINT=f32)
    and, where it is not f32, OpenVINO's default float precision (bf16 on CPUs with AMX), which
    is what OpenVINO serves a float model in.

Served models
    MACs per image come from ``count_macs``, over the model's ONNX graph: Conv, ConvInteger,
    QLinearConv, Gemm, MatMul, MatMulInteger and QLinearMatMul, with the shapes
    ``onnx.shape_inference`` gives once the batch dimension is set. Achieved MAC/s at a batch
    size = MACs per image x batch / the served p50 latency. ``fraction_of_int8_peak`` divides it
    by the int8 peak at the model's thread count; a float form also gets
    ``fraction_of_precision_peak``, against the peak of the precision it ran in (fp32, or
    OpenVINO's bf16). The peak is the fastest call and the latency a median, so the fraction is
    the share of the best the machine showed that a model gets in ordinary serving.

    The models come from one of two sources:

    * by default, a self-contained case: resnet18 and mobilenet_v2 (``--archs``) at 64x64, random
      weights, 10 classes; the fp32 model exported with ``export_onnx_fp32`` and an int8 model by
      static PTQ (minmax, per-channel, calibrated on random images) exported with
      ``export_onnx_qdq``, as the pipeline does. Each is timed on ONNX Runtime and OpenVINO at
      each batch size (``pipeline.bench.measure_latency``, a fresh runner per batch size) and
      served, like the report does, by the faster of the two (random weights: no accuracy to
      judge);
    * ``--summary FILE``: a finished run's summary (``qpipe run --output-json FILE``, or
      ``qpipe status RUN_ID --json > FILE``) with its store (``--store`` or ``QPIPE_STORE_URI``):
      every measured row at each batch size, served by the runtime and p50 the report chose; the
      MACs are counted in the ONNX file its benchmark manifest names (its digest checked before
      it is read), or in its fp32 baseline's for a row without one (the same architecture), and
      the thread count is the benchmark's.

Output
    One JSON object on stdout (progress on stderr): ``cpu`` (model and int8 flags), ``peak``
    {precision: {threads: best rate, runtime, graph}}, ``peak_measurements`` (every one, with
    OpenVINO's kernel names), ``models`` (per model: MACs per image, and per batch size the
    serving runtime, p50, achieved GMAC/s and fractions), ``skipped`` (rows that could not be
    counted, with why), and ``other_load``: the share of the CPUs other processes used while
    the peaks and the models were timed (figures taken on a busy machine are low).

    .venv/bin/python -m bench.peak
    .venv/bin/python -m bench.peak --summary summary.json --store file:///path/to/store
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.int8_vs_fp32 import cpu_info, parse_batch_sizes

CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> the input that holds its weight
MATMUL_A = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}  # op -> the input that holds its A
PEAK_GRAPHS = ("conv", "matmul")
FLOAT_RUNTIMES = {"onnxruntime": "fp32", "openvino": "f32"}  # the fp32 peak: OpenVINO told to keep f32


def log(msg: str) -> None:
    print(f"[peak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- counting MACs

def count_macs(model: Any, batch: int = 1) -> dict[str, Any]:
    """The multiply-accumulates of one run of ``model`` (an ``onnx.ModelProto``) on ``batch``
    images: {"total", "by_op": {op type: MACs}, "layers": how many nodes were counted}.

    A convolution costs (output elements) x (input channels per group) x (kernel elements), read
    off its output shape and its weight's shape (C_out, C_in / group, k...); a Gemm (output
    elements) x K; a MatMul (output elements, broadcast batch dimensions included) x the last
    dimension of A. Every graph input's leading dimension that is not a number (a dynamic batch)
    is set to ``batch`` before shape inference. ValueError names the node whose shapes stay
    unknown."""
    import onnx
    from onnx import shape_inference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {t.name for t in fixed.graph.initializer}
    for inp in fixed.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in initializers and len(dims) and not dims[0].dim_value:
            dims[0].dim_value = batch  # replaces a dim_param such as "batch"
    graph = shape_inference.infer_shapes(fixed, strict_mode=True).graph
    shapes: dict[str, list[int | None]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)

    def shape(node: Any, name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None or d <= 0 for d in dims):
            raise ValueError(f"{node.op_type} node {node.name or node.output[0]!r}: the shape of {name!r} is not "
                             f"known after shape inference ({dims}): count a model whose shapes are static beyond "
                             "the batch dimension")
        return dims  # type: ignore[return-value]

    by_op: dict[str, int] = {}
    layers = 0
    for node in graph.node:
        if node.op_type in CONV_WEIGHT:
            weight = shape(node, node.input[CONV_WEIGHT[node.op_type]])
            macs = math.prod(shape(node, node.output[0])) * math.prod(weight[1:])
        elif node.op_type == "Gemm":
            a = shape(node, node.input[0])
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            macs = math.prod(shape(node, node.output[0])) * (a[0] if trans_a else a[1])
        elif node.op_type in MATMUL_A:
            macs = math.prod(shape(node, node.output[0])) * shape(node, node.input[MATMUL_A[node.op_type]])[-1]
        else:
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
        layers += 1
    return {"total": sum(by_op.values()), "by_op": by_op, "layers": layers}


# ----------------------------------------------------------------------------- the peak graphs

def peak_graph(kind: str, *, layers: int, width: int, extent: int, int8: bool, seed: int = 0) -> Any:
    """A stack of ``layers`` layers (see the module docstring) as an ``onnx.ModelProto``: int8
    layers in qpipe's QDQ form when ``int8``, plain float ones otherwise. Weights are random,
    scaled by 1 / sqrt(fan-in) so that the activations keep their size through the stack."""
    from onnx import TensorProto, checker, helper, numpy_helper

    if kind not in PEAK_GRAPHS:
        raise ValueError(f"unknown peak graph {kind!r}: use one of {', '.join(PEAK_GRAPHS)}")
    rng = np.random.default_rng(seed)
    if kind == "matmul":  # as many MACs per layer as a conv of the same width and extent, roughly
        width = width * 8
    shape = [1, width, extent, extent] if kind == "conv" else [extent * 4, width]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "act_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "act_zero_point")]
    nodes, current = [], "input"
    for i in range(layers):
        w_shape = (width, width, 3, 3) if kind == "conv" else (width, width)
        fan_in = math.prod(w_shape[1:]) if kind == "conv" else width
        w = (rng.standard_normal(w_shape) / math.sqrt(fan_in)).astype(np.float32)
        if int8:
            axis = 0 if kind == "conv" else 1  # per output channel
            reduce = tuple(d for d in range(w.ndim) if d != axis)
            scale = (np.abs(w).max(axis=reduce) / 127.0).astype(np.float32)
            q = np.clip(np.round(w / np.expand_dims(scale, reduce)), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(q, f"w{i}"), numpy_helper.from_array(scale, f"w{i}_scale"),
                      numpy_helper.from_array(np.zeros(width, np.int8), f"w{i}_zero_point")]
            nodes += [helper.make_node("QuantizeLinear", [current, "act_scale", "act_zero_point"], [f"x{i}_q"]),
                      helper.make_node("DequantizeLinear", [f"x{i}_q", "act_scale", "act_zero_point"], [f"x{i}_dq"]),
                      helper.make_node("DequantizeLinear", [f"w{i}", f"w{i}_scale", f"w{i}_zero_point"],
                                       [f"w{i}_dq"], axis=axis)]
            current, weight = f"x{i}_dq", f"w{i}_dq"
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            weight = f"w{i}"
        out = "logits" if i == layers - 1 else f"y{i}"
        if kind == "conv":
            nodes.append(helper.make_node("Conv", [current, weight], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        else:
            nodes.append(helper.make_node("MatMul", [current, weight], [out], name=f"matmul{i}"))
        current = out
    graph = helper.make_graph(nodes, f"peak-{kind}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    checker.check_model(model)
    return model


def runner_for(runtime: str, path: Path, threads: int, precision_hint: str | None = None) -> Any:
    """``pipeline.runtimes``' runner for ``runtime``; an OpenVINO one told ``precision_hint``
    (INFERENCE_PRECISION_HINT) when given, before its first call compiles it."""
    from pipeline.runtimes import OrtRunner, OvRunner

    if runtime == "onnxruntime":
        return OrtRunner(path, threads)
    runner = OvRunner(path, threads)
    if precision_hint:
        runner.config["INFERENCE_PRECISION_HINT"] = precision_hint  # read when it compiles, at the first call
    return runner


def ov_kernels(runner: Any) -> list[str]:
    """The oneDNN kernels OpenVINO chose for the convolutions and matrix products of a runner
    that has run (e.g. brgconv_avx512_amx_I8): which instructions did the work."""
    found: set[str] = set()
    for compiled in getattr(runner, "compiled", {}).values():
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if str(info["layerType"].astype(str)) in ("Convolution", "FullyConnected", "MatMul"):
                found.add(str(info["primitiveType"].astype(str)))
    return sorted(found)


def time_calls(fn: Callable[[Any], Any], x: Any, seconds: float, warmup: int = 2) -> dict[str, float]:
    """Call ``fn(x)`` for ``seconds`` (at least 5 calls) after ``warmup`` calls: the fastest and
    the median call in ms."""
    for _ in range(warmup):
        fn(x)
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        t0 = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return {"best_ms": min(samples), "p50_ms": statistics.median(samples), "calls": len(samples)}


class LoadMeter:
    """The share of the machine's CPUs that other processes used between ``start`` and ``stop``
    (``pipeline.bench.machine_busy_s`` less this process's own CPU time)."""

    def __init__(self) -> None:
        from pipeline.bench import machine_busy_s

        self._busy = machine_busy_s
        self._start = (machine_busy_s(), time.perf_counter(), time.process_time())

    def share(self) -> float | None:
        busy0, wall0, own0 = self._start
        busy1, wall, own = self._busy(), time.perf_counter() - wall0, time.process_time() - own0
        if busy0 is None or busy1 is None or wall <= 0:
            return None
        return round(max(0.0, (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1))), 3)


def measure_peaks(args: argparse.Namespace, thread_counts: Iterable[int], workdir: Path) -> tuple[dict, list[dict]]:
    """The peaks ({precision: {threads: {gmacs, runtime, graph}}}) and every measurement."""
    import onnx
    import torch

    cases = []  # (precision, graph, runtime, OpenVINO precision hint, path, MACs)
    shapes: dict[Path, list[int]] = {}
    for kind in PEAK_GRAPHS:
        for int8 in (True, False):
            model = peak_graph(kind, layers=args.peak_layers, width=args.peak_width, extent=args.peak_extent,
                               int8=int8)
            path = workdir / f"peak-{kind}-{'int8' if int8 else 'float'}.onnx"
            onnx.save(model, str(path))
            macs = count_macs(model)["total"]
            shapes[path] = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            if int8:
                cases += [("int8", kind, rt, None, path, macs) for rt in ("onnxruntime", "openvino")]
            else:
                cases += [("fp32", kind, rt, FLOAT_RUNTIMES[rt], path, macs) for rt in FLOAT_RUNTIMES]
                cases.append(("ov-default", kind, "openvino", None, path, macs))
    best: dict[tuple, dict] = {}
    for r in range(args.rounds):
        for threads in thread_counts:
            for precision, kind, runtime, hint, path, macs in cases:
                runner = runner_for(runtime, path, threads, hint)
                x = torch.randn(*shapes[path])
                timing = time_calls(runner, x, args.seconds)
                if precision == "ov-default":
                    precision = {"f32": "fp32"}.get(runner.precision, runner.precision)
                    if precision == "fp32":
                        continue  # the same measurement as OpenVINO's fp32
                key = (precision, kind, runtime, threads)
                m = {"precision": precision, "graph": kind, "runtime": runtime, "threads": threads, "macs": macs,
                     "best_ms": round(timing["best_ms"], 4), "p50_ms": round(timing["p50_ms"], 4),
                     "gmacs_best": round(macs / timing["best_ms"] / 1e6, 1),
                     "gmacs_p50": round(macs / timing["p50_ms"] / 1e6, 1)}
                if runtime == "openvino":
                    m["kernels"] = ov_kernels(runner)
                if key not in best or m["gmacs_best"] > best[key]["gmacs_best"]:
                    best[key] = m
                log(f"round {r + 1}: {precision} {kind} on {runtime}, {threads} thread(s): "
                    f"{m['gmacs_best']:.0f} GMAC/s best, {m['gmacs_p50']:.0f} median")
    peaks: dict[str, dict[str, dict]] = {}
    for m in best.values():
        slot = peaks.setdefault(m["precision"], {})
        top = slot.get(str(m["threads"]))
        if top is None or m["gmacs_best"] > top["gmacs"]:
            slot[str(m["threads"])] = {"gmacs": m["gmacs_best"], "runtime": m["runtime"], "graph": m["graph"]}
    return peaks, sorted(best.values(), key=lambda m: (m["precision"], m["threads"], m["graph"], m["runtime"]))


# ----------------------------------------------------------------------------- served models

def served_entry(macs: int, batch: int, p50_ms: float, runtime: str, precision: str, threads: int,
                 peaks: dict) -> dict[str, Any]:
    """One batch size of a served model: its rate and its fractions of the peaks (left out where
    the peak at its thread count was not measured)."""
    gmacs = macs * batch / p50_ms / 1e6
    out: dict[str, Any] = {"runtime": runtime, "precision": precision, "latency_ms_p50": round(p50_ms, 4),
                           "achieved_gmacs": round(gmacs, 2)}
    int8_peak = peaks.get("int8", {}).get(str(threads))
    if int8_peak:
        out["fraction_of_int8_peak"] = round(gmacs / int8_peak["gmacs"], 4)
    own = peaks.get(precision, {}).get(str(threads))
    if precision != "int8" and own:
        out["fraction_of_precision_peak"] = round(gmacs / own["gmacs"], 4)
    return out


def build_case(arch: str, image_size: int, workdir: Path, seed: int, calib_batches: int) -> dict[str, Path]:
    """{"fp32": path, "int8": path}: the ONNX files of a random-weight ``arch`` (10 classes), as
    the pipeline exports them (the int8 one after static PTQ on random images)."""
    import torch

    from pipeline import quant
    from pipeline.models import build_model
    from pipeline.runtimes import export_onnx_fp32, export_onnx_qdq

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10).eval()
    example = (torch.zeros(1, 3, image_size, image_size),)
    fp32 = export_onnx_fp32(model, example, workdir / f"{arch}-fp32.onnx")
    qconfig = {"observer": "minmax", "per_channel": True, "backend": "x86", "arch": arch}
    observed = quant.prepare_static(model, example, **qconfig)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(calib_batches):
            observed(torch.randn(8, 3, image_size, image_size, generator=gen))
    observed = quant.calibrated(model, example, quant.observer_state(observed), **qconfig)
    int8 = export_onnx_qdq(observed, example, workdir / f"{arch}-int8.onnx")
    return {"fp32": fp32, "int8": int8}


def self_contained(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """The default case's models, each timed on ONNX Runtime and OpenVINO; "batches" filled in
    by ``serve`` once the peaks are known."""
    import onnx
    import torch

    from pipeline.bench import measure_latency
    from pipeline.runtimes import load_runner

    models = []
    for arch in args.archs:
        log(f"{arch} at {args.image_size}x{args.image_size}: exporting fp32 and int8 (static PTQ) ONNX")
        for precision, path in build_case(arch, args.image_size, workdir, args.seed, args.calib_batches).items():
            timed: dict[str, dict[str, Any]] = {}
            for bs in args.batch_sizes:
                x = torch.randn(bs, 3, args.image_size, args.image_size)
                for rt in ("onnxruntime", "openvino"):
                    runner = load_runner(rt, path, threads=args.threads, batch_size=bs)
                    res = measure_latency(runner, x, warmup=3, iterations=args.iterations, max_seconds=args.seconds)
                    ran_in = precision if precision == "int8" or rt != "openvino" else \
                        {"f32": "fp32"}.get(runner.precision, runner.precision)
                    timed.setdefault(str(bs), {})[rt] = {"p50_ms": res["p50_ms"], "precision": ran_in}
                line = ", ".join(f"{rt} {v['p50_ms']:.2f} ms" for rt, v in timed[str(bs)].items())
                log(f"{arch} {precision} batch {bs}: {line}")
            models.append({"name": f"{arch}-{precision}", "arch": arch, "method": precision, "threads": args.threads,
                           "macs_per_image": count_macs(onnx.load(str(path)))["total"], "timed": timed})
    return models


def serve(models: list[dict[str, Any]], peaks: dict) -> None:
    """Fill each self-contained model's "batches" with its fastest runtime at each batch size."""
    for m in models:
        m["batches"] = {}
        for bs, per_rt in m.pop("timed").items():
            rt = min(per_rt, key=lambda r: per_rt[r]["p50_ms"])
            m["batches"][bs] = served_entry(m["macs_per_image"], int(bs), per_rt[rt]["p50_ms"], rt,
                                            per_rt[rt]["precision"], m["threads"], peaks)
            m["batches"][bs]["p50_ms_by_runtime"] = {r: round(v["p50_ms"], 4) for r, v in per_rt.items()}


def from_summary(summary: dict[str, Any], store: Any, workdir: Path) -> tuple[list[dict[str, Any]], list[dict]]:
    """The served rows of a finished run's summary, with their MACs per image and thread count;
    "batches" holds (runtime, p50, precision) until ``serve_summary``. Rows that cannot be
    counted are returned as skipped, with why."""
    import onnx

    from pipeline.summary import baseline_of, measured

    manifests: dict[str, dict] = {}
    counted: dict[str, int] = {}  # by the ONNX file's sha256

    def manifest(row: dict) -> dict:
        uri = row.get("manifest")
        if not uri:
            raise ValueError("the summary row names no benchmark manifest (a summary from before manifests were "
                             "listed): rerun the report")
        if uri not in manifests:
            manifests[uri] = store.get_json(store.key_of(uri))
        return manifests[uri]

    def macs_of(row: dict) -> int:
        ref = manifest(row)["outputs"].get("onnx")
        if ref is None:
            base = baseline_of(summary, row)
            ref = manifest(base)["outputs"].get("onnx") if base else None
        if ref is None:
            raise ValueError("neither it nor its fp32 baseline has an ONNX file to count MACs in: run with "
                             "benchmark.runtimes including onnxruntime or openvino")
        if ref["sha256"] not in counted:
            path = store.fetch(ref, workdir / f"{ref['sha256']}.onnx")  # digest checked before it is read
            counted[ref["sha256"]] = count_macs(onnx.load(str(path)))["total"]
        return counted[ref["sha256"]]

    models, skipped = [], []
    for row in measured(summary):
        try:
            macs = macs_of(row)
            threads = int(manifest(row)["metrics"].get("threads", 1))
        except (ValueError, KeyError, OSError) as err:
            skipped.append({"name": row["name"], "why": str(err)})
            continue
        batches = {}
        for bs, p50 in row["latency_ms_p50"].items():
            rt = (row.get("runtime") or {}).get(bs, "torchscript")
            precision = "int8" if row["method"] in ("static", "qat") else "fp32"
            if row["method"] == "fp32" and rt == "openvino":
                ran_in = (row.get("runtimes") or {}).get("openvino", {}).get("inference_precision", "f32")
                precision = {"f32": "fp32"}.get(ran_in, ran_in)
            batches[bs] = (rt, float(p50), precision)
        models.append({"name": row["name"], "arch": row.get("arch"), "method": row["method"], "threads": threads,
                       "macs_per_image": macs, "batches": batches})
    return models, skipped


def serve_summary(models: list[dict[str, Any]], peaks: dict) -> None:
    for m in models:
        m["batches"] = {bs: served_entry(m["macs_per_image"], int(bs), p50, rt, precision, m["threads"], peaks)
                        for bs, (rt, p50, precision) in m["batches"].items()}


# ----------------------------------------------------------------------------- command line

def parse_thread_counts(text: str) -> list[int]:
    cores = len(os.sched_getaffinity(0))
    try:
        counts = sorted({cores if t.strip() == "all" else int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give thread counts and 'all', comma-separated, e.g. 1,all") \
            from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts must be positive")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--summary", type=Path, default=None,
                   help="a finished run's summary JSON (qpipe run --output-json, qpipe status --json); "
                        "default: the self-contained case")
    p.add_argument("--store", default=None, help="the run's artifact store (default: $QPIPE_STORE_URI)")
    p.add_argument("--archs", type=lambda s: [a.strip() for a in s.split(",") if a.strip()],
                   default=["resnet18", "mobilenet_v2"], help="self-contained case: comma-separated archs")
    p.add_argument("--image-size", type=int, default=64, help="self-contained case")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 32], help="self-contained case")
    p.add_argument("--threads", type=int, default=1, help="self-contained case: threads of each runtime")
    p.add_argument("--calib-batches", type=int, default=2, help="self-contained case: random batches of 8")
    p.add_argument("--iterations", type=int, default=40, help="self-contained case: timed calls per measurement")
    p.add_argument("--peak-threads", type=parse_thread_counts, default=parse_thread_counts("1,all"),
                   help="thread counts of the peak measurements ('all': every core this process may use)")
    p.add_argument("--peak-layers", type=int, default=8)
    p.add_argument("--peak-width", type=int, default=128, help="channels (conv); columns / 8 (matmul)")
    p.add_argument("--peak-extent", type=int, default=56, help="map height and width (conv); rows / 4 (matmul)")
    p.add_argument("--rounds", type=int, default=2, help="peak measurement rounds; the best counts")
    p.add_argument("--seconds", type=float, default=0.75, help="time cap of one measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("image_size", "threads", "calib_batches", "iterations", "peak_layers", "peak_width", "peak_extent",
                 "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
    started = time.perf_counter()
    import onnxruntime
    import openvino
    import torch

    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qpipe-peak-") as tmp:
        workdir = Path(tmp)
        if args.summary is not None:
            from pipeline.settings import settings
            from pipeline.store import open_store

            summary = json.loads(args.summary.read_text())
            store = open_store(args.store or settings().store_uri or "")
            models, skipped = from_summary(summary, store, workdir)
            source = f"summary of run {summary.get('run_id')} ({args.summary})"
        else:
            meter = LoadMeter()
            models = self_contained(args, workdir)
            models_load = meter.share()
            source = (f"self-contained: {', '.join(args.archs)} at {args.image_size}x{args.image_size}, random "
                      "weights, fp32 and static PTQ int8 ONNX, served by the faster of ONNX Runtime and OpenVINO")
        thread_counts = sorted(set(args.peak_threads) | {m["threads"] for m in models})
        meter = LoadMeter()
        peaks, measurements = measure_peaks(args, thread_counts, workdir)
        peaks_load = meter.share()
    if args.summary is not None:
        serve_summary(models, peaks)
        models_load = None  # timed by the run, not here
    else:
        serve(models, peaks)
    for m in models:
        for bs, b in m["batches"].items():
            log(f"{m['name']} batch {bs} on {b['runtime']}: {b['achieved_gmacs']:.1f} GMAC/s, "
                f"{b.get('fraction_of_int8_peak', float('nan')):.1%} of the int8 peak")
    report = {
        "benchmark": "peak",
        "source": source,
        "cpu": {**cpu_info(), "cores_usable": len(os.sched_getaffinity(0))},
        "peak": peaks,
        "models": models,
        "skipped": skipped,
        "other_load": {"peaks": peaks_load, "models": models_load},
        "peak_measurements": measurements,
        "method": {"peak_graphs": {"layers": args.peak_layers, "width": args.peak_width, "extent": args.peak_extent},
                   "rounds": args.rounds, "seconds": args.seconds,
                   "statistic": "peak: MACs over the fastest call; models: MACs x batch over the p50 latency"},
        "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
