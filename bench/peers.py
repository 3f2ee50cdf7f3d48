"""qpipe side by side with its peers: NNCF post-training quantization run on OpenVINO and ONNX
Runtime static quantization, against qpipe's selected int8 artifact.

What it measures
    For each case (resnet18, mobilenet_v2, mobilenet_v3_large and efficientnet_b0 at 64x64, and
    the same four at 224x224 for latency, by default), qpipe's own stages run in this process
    (``pipeline.runner.run_in_process`` on the demo spec ``examples/digits.yaml`` with the arch,
    image size and epochs of the case): ingest of ``builtin:digits``, fp32 fine-tuning,
    calibration, quantization, benchmarks and the report, which selects the fastest variant
    within the accuracy budget. The spec's variants are qpipe's two static variants and, inside
    qpipe's own tournament, an NNCF and an ONNX Runtime engine variant (``--no-engines`` leaves
    them out): what qpipe serves may be another engine's model, as a user of qpipe would get it.
    Then, from the store that run
    wrote, the same three inputs feed every quantizer:

    * the fp32 checkpoint: the finetune stage's ``state_dict``;
    * the calibration images: the ingest stage's ``calib`` shard (``calib_size`` images drawn,
      seeded, from the train split by ``pipeline.data.calibration_indices``), the very tensors the
      calibrate stage observes, read with the stages' own ``load_split``;
    * the validation split: the ingest stage's ``val`` shard, normalised by ``pipeline.train``.

    and these int8 models are compared:

    * ``qpipe``          what the report chose for each batch size: the selected variant on the
                         runtime that serves it fastest within the accuracy budget (its TorchScript
                         file in PyTorch, or its ONNX QDQ export on ONNX Runtime or OpenVINO; see
                         ``summary["selection_per_batch"]``); top-1 and size are those of the form
                         chosen for the first batch size. ``qpipe_torchscript`` (the selected
                         variant's TorchScript file) is timed alongside for reference;
    * ``qpipe_own_export`` qpipe's own export (its best static variant's ONNX QDQ file, quantizers
                         placed by ``pipeline.runtimes``) on OpenVINO, whatever the report served:
                         the target is within 1.05x of NNCF's latency;
    * ``openvino_nncf``  ``nncf.quantize`` (defaults: performance preset, fast bias correction) on the
                         OpenVINO model converted from the fp32 module by ``openvino.convert_model``,
                         calibrated on every calibration image, saved as IR and run by the OpenVINO
                         CPU plugin, compiled for each batch size with a static shape;
    * ``onnxruntime_qdq`` ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8
                         weights, uint8 activations, MinMax calibration through a
                         CalibrationDataReader over the calibration images) on the fp32 ONNX model
                         (``torch.onnx.export``, dynamo exporter, after ``quant_pre_process``), run
                         on ONNX Runtime's CPUExecutionProvider.

    For each: top-1 on the validation split and its drop vs the fp32 checkpoint (run by PyTorch),
    latency p50/p95 at each batch size (1 and 32) with ``--threads`` threads for every runtime
    (``torch.set_num_threads``, ORT ``intra_op_num_threads``, OpenVINO ``INFERENCE_NUM_THREADS``
    with one stream), and the serialized size (TorchScript file; .onnx file; IR .xml + .bin). The
    fp32 model converted to ONNX and to OpenVINO is also evaluated (top-1 only), to show the
    conversions themselves lose nothing; the fp32 row's latency is the one qpipe's benchmark
    stage measured in the pipeline run.

How
    Latency: ``--rounds`` interleaved rounds; each round times every int8 model at every batch
    size (``pipeline.bench.measure_latency`` on real validation images), in an order rotated from
    round to round, after ``--warmup`` calls, for ``--iterations`` calls or ``--max-seconds``.
    Each round loads every model afresh for each batch size (one loaded instance keeps a speed of
    its own, ``interleaved``), first called at that size: with
    oneDNN kernels the first call's shape sticks (qpipe's int8 TorchScript first called at batch
    64 then runs batch 1 about 2x slower). ``qpipe_after_eval`` is that case, timed on purpose:
    the instance that ran the accuracy pass at batch 64, as qpipe's benchmark stage does. The
    p50/p95 shown are medians over rounds; each ratio is the median over rounds of the ratio
    measured within the round. Each measurement records ``other_load``, the share of the CPUs
    other processes used meanwhile (``pipeline.bench.machine_busy_s``); ``noise`` lists it per
    round and gives the ratios over the quiet rounds too.

    The 224x224 case fine-tunes resnet18 for ``--large-epochs`` (1) epoch on the digits shown at
    224x224 (upscaled from 8x8), starting from the fp32 checkpoint of the resnet18 64x64 case
    (from random weights when that case is not run), with only the two static variants. Its
    latency is that of a real fine-tuned checkpoint; its accuracy is reported but not judged.

Output
    One JSON object on stdout (everything else, including the peers' progress bars, goes to
    stderr): per case the rows, ``ratios`` and ``targets``, then ``targets`` over all cases:

    * ``latency``: qpipe p50 / the fastest peer's p50 in the same round, at each batch size
      (median over rounds; ``verdict`` adds the sign test: met, tie or slower, ``judge``);
      met when <= ``--target-ratio`` (1.0), aim ``--aim-ratio`` (0.9);
    * ``accuracy``: qpipe's top-1 drop vs fp32 <= NNCF's plus one validation image (64x64 cases).

    A missed target is reported, never an error: the exit status is non-zero only when something
    failed (2 when the ``peers`` extra is missing).

    .venv/bin/python -m bench.peers --rounds 9     # full: 37 min on 2 cores, fine-tunes reused (--store)
    .venv/bin/python -m bench.peers --quick        # 1 epoch, one static variant, no 224 case
    .venv/bin/python -m bench.peers --store /tmp/peers-store   # keep (and reuse) qpipe's stages
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.int8_vs_fp32 import (
    add_timing_args,
    cpu_info,
    measure,
    median_ratio,
    parse_batch_sizes,
    round_load,
)
from pipeline.bench import threads
from pipeline.plan import build_plan
from pipeline.quant import load_torchscript, set_engine
from pipeline.runner import run_in_process
from pipeline.runtimes import OrtRunner, OvRunner
from pipeline.sources import prepare_sources
from pipeline.spec import load_spec
from pipeline.stages import StageContext, manifest_key
from pipeline.stages.benchmark import file_runner
from pipeline.stages.common import example_input, load_fp32, load_split, norm
from pipeline.store import FileStore, Store
from pipeline.summary import select
from pipeline.train import evaluate, normalize

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "examples" / "digits.yaml"
PEER_MODULES = ("onnx", "onnxscript", "onnxruntime", "openvino", "nncf")
QPIPE, NNCF, ORT = "qpipe", "openvino_nncf", "onnxruntime_qdq"
QPIPE_AFTER_EVAL = "qpipe_after_eval"  # informational: the same artifact, first called at batch 64
QPIPE_TORCHSCRIPT = "qpipe_torchscript"  # informational: the selected variant's TorchScript file
PEERS = (NNCF, ORT)
# Fine-tuning epochs where the demo spec's 3 leave the fp32 model short of converging on digits
# from random weights (mobilenet_v2 at lr 0.01: top-1 0.10, 0.10, 0.57, 0.91, 0.97 after epochs 1-5):
# a drop measured against an unconverged baseline says little.
EPOCHS = {"mobilenet_v2": 6, "mobilenet_v3_large": 6, "efficientnet_b0": 6}
STATIC_VARIANTS = [{"name": "ptq-minmax", "method": "static", "observer": "minmax"},
                   {"name": "ptq-histogram", "method": "static", "observer": "histogram"}]
# the other engines inside qpipe's own tournament (pipeline/engines.py): what the report serves is
# the fastest of qpipe's variants and these, each on its runtimes, within the budget
ENGINE_VARIANTS = [{"name": "nncf", "method": "static", "engine": "nncf"},
                   {"name": "ort-minmax", "method": "static", "engine": "onnxruntime"}]
ARCHS = "resnet18,mobilenet_v2,mobilenet_v3_large,efficientnet_b0"
QPIPE_OWN = "qpipe_own_export"  # qpipe's own export (its best static variant) on OpenVINO
OWN_EXPORT_TARGET = 1.05  # qpipe's own export on OpenVINO / NNCF's, at most


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Case:
    """One model at one input size, with how much of qpipe's pipeline to run for it."""

    arch: str
    image_size: int
    epochs: int
    variants: list[dict] | None  # None: the demo spec's variants
    judge_accuracy: bool = True
    init_from: str | None = None  # start from the fp32 checkpoint of this (earlier) case, if it ran

    @property
    def name(self) -> str:
        return f"{self.arch}@{self.image_size}"


# ----------------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", default=ARCHS, help="comma-separated torchvision archs")
    p.add_argument("--image-size", type=int, default=64, help="the demo's input size")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"fine-tuning epochs of every case at --image-size (default: the demo spec's 3; {EPOCHS})")
    p.add_argument("--large-archs", default=ARCHS, help="comma-separated archs of the large-input cases")
    p.add_argument("--no-engines", action="store_true",
                   help="leave NNCF and ONNX Runtime out of qpipe's own tournament (qpipe's engine alone)")
    p.add_argument("--large-size", type=int, default=224, help="input size of the latency case; 0 skips it")
    p.add_argument("--large-epochs", type=int, default=1, help="fine-tuning epochs of the latency case")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 32], help="comma-separated")
    p.add_argument("--threads", type=int, default=1, help="threads of every runtime (the demo spec benchmarks at 1)")
    add_timing_args(p, warmup=3)
    p.add_argument("--target-ratio", type=float, default=1.0, help="qpipe / fastest peer latency, at most")
    p.add_argument("--aim-ratio", type=float, default=0.9, help="qpipe / fastest peer latency aimed for")
    p.add_argument("--seed", type=int, default=0, help="the spec's seed (split, calibration draw, training)")
    p.add_argument("--store", type=Path, default=None,
                   help="qpipe's artifact store folder (kept; a rerun reuses its stages); a temp dir by default")
    p.add_argument("--quick", action="store_true",
                   help="1 epoch, one static variant, no large case, 2 rounds of at most 20 calls")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 1
        args.large_size = 0
        args.rounds = min(args.rounds, 2)
        args.iterations = min(args.iterations, 20)
        args.max_seconds = min(args.max_seconds, 1.0)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.large_archs = [a.strip() for a in args.large_archs.split(",") if a.strip()]
    if not args.archs and not args.large_size:
        p.error("nothing to measure: give --archs or a --large-size")
    for name in ("threads", "rounds", "iterations", "large_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.image_size < 16 or (args.large_size and args.large_size < 16):
        p.error("image sizes must be >= 16 (the spec's minimum)")
    if args.warmup < 0 or args.max_seconds <= 0:
        p.error("--warmup must be >= 0 and --max-seconds > 0")
    return args


def cases(args: argparse.Namespace) -> list[Case]:
    engines = [] if args.no_engines else ENGINE_VARIANTS
    variants = STATIC_VARIANTS[:1] + engines[:1] if args.quick else STATIC_VARIANTS + engines
    out = [Case(arch, args.image_size, args.epochs or EPOCHS.get(arch, 0), variants) for arch in args.archs]
    if args.large_size:
        for arch in args.large_archs:
            small = next((c.name for c in out if c.arch == arch), None)
            out.append(Case(arch, args.large_size, args.large_epochs, STATIC_VARIANTS + engines,
                            judge_accuracy=False, init_from=small))
    return out


def case_spec(case: Case, args: argparse.Namespace, base: dict | None = None, init: Path | None = None) -> dict:
    """The demo spec with this case's arch, size, epochs, variants and the bench's thread count;
    ``init`` is a state_dict file to fine-tune from instead of random weights."""
    spec = copy.deepcopy(base if base is not None else yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8")))
    spec["name"] = f"peers-{case.arch}-{case.image_size}"
    spec["seed"] = args.seed
    spec["data"]["image_size"] = case.image_size
    spec["model"]["arch"] = case.arch
    spec["model"]["weights"] = str(init) if init else None
    if case.epochs:
        spec["finetune"]["epochs"] = case.epochs
    if case.variants is not None:
        spec["quantize"]["variants"] = copy.deepcopy(case.variants)
    spec["benchmark"]["threads"] = args.threads
    spec["benchmark"]["batch_sizes"] = list(args.batch_sizes)
    if args.quick:
        spec["benchmark"]["iterations"] = 5
    return spec


# ------------------------------------------------------------------------------ qpipe's side

@dataclass
class QpipeRun:
    """What one in-process qpipe run left in the store, loaded for the comparison."""

    summary: dict
    selected: str
    selection: str
    data: dict
    fp32: torch.nn.Module
    fp32_bench: dict
    int8_bench: dict
    int8: Callable[[torch.Tensor], torch.Tensor]
    int8_path: Path
    calib: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor]
    mean_std: dict = field(default_factory=dict)
    epochs: int = 0
    state_dict: Path | None = None
    seconds: float = 0.0
    # batch size -> (variant, runtime, file): what the report chose to serve that batch size with
    forms: dict[str, tuple[str, str, Path]] = field(default_factory=dict)
    # qpipe's own export of its best static variant (the variant, its OpenVINO IR), timed on OpenVINO
    own: tuple[str, Path] | None = None


def pick_variant(summary: dict) -> tuple[str, str]:
    """The report's selected variant; when it selected none, the most accurate one that ran."""
    if summary.get("selected"):
        return summary["selected"], summary.get("selection_reason", "")
    ran = [v for v in summary.get("variants", []) if v.get("accuracy_top1") is not None]
    if not ran:
        raise RuntimeError(f"qpipe's run {summary.get('run_id')} produced no int8 variant "
                           f"(failures: {summary.get('failures')})")
    best = max(ran, key=lambda v: v["accuracy_top1"])
    return best["name"], (f"the report selected none ({summary.get('selection_reason')}); "
                          f"using the most accurate variant instead")


def run_qpipe(spec_dict: dict, store: Store, workdir: Path) -> QpipeRun:
    spec = load_spec(spec_dict)
    t0 = time.perf_counter()
    summary = run_in_process(spec, store, on_event=lambda node, state: log(f"  {spec.name}: {node} {state}"))
    seconds = time.perf_counter() - t0
    if summary.get("baseline") is None:
        raise RuntimeError(f"qpipe's run {summary['run_id']} has no fp32 baseline: {summary.get('failures')}")
    selected, reason = pick_variant(summary)
    # The plan gives every stage's content key, hence its manifest in the store.
    nodes = {n["id"]: n for n in build_plan(spec, prepare_sources(spec, store))}

    def manifest(node_id: str) -> dict:
        n = nodes[node_id]
        return store.get_json(manifest_key(n["stage"], n["key"]))

    data, finetune = manifest("ingest"), manifest("finetune")
    fp32_bench, int8_bench = manifest("benchmark:fp32"), manifest(f"benchmark:{selected}")
    ctx = StageContext(store, "peers", "-", "peers", workdir)
    fp32 = load_fp32(ctx, finetune, data)
    state_dict = ctx.fetch(finetune["outputs"]["state_dict"], "fp32-state_dict.pt")
    calib, _ = load_split(ctx, data, "calib")  # the calibrate stage's own images
    val = load_split(ctx, data, "val")
    # qpipe's own engine: the selected variant when it is one of qpipe's, else qpipe's fastest at the
    # first batch size among its variants within the budget (else its most accurate); its
    # TorchScript file is the reference timed alongside, its ONNX export the "own export" form
    first = str(spec.benchmark.batch_sizes[0])
    own_rows = [v for v in summary["variants"] if v.get("accuracy_top1") is not None and not v.get("engine")
                and v.get("method") == "static"]
    fastest_within, _ = select(own_rows, summary["accuracy_budget"], first)  # the report's own rule
    own_name = (selected if any(v["name"] == selected for v in own_rows) else
                fastest_within or max(own_rows, key=lambda v: v["accuracy_top1"])["name"])
    own_bench = manifest(f"benchmark:{own_name}")
    set_engine(own_bench["backend"])
    int8_path = ctx.fetch(own_bench["outputs"]["model"], f"qpipe-{own_name}.ts")
    own = None
    if "openvino" in own_bench.get("runtimes", {}):
        own = (own_name, served_file(ctx, own_bench, "openvino", workdir / f"own-{own_name}"))
    forms = {}
    for bs in (str(b) for b in spec.benchmark.batch_sizes):
        pick = (summary.get("selection_per_batch") or {}).get(bs, {"variant": selected, "runtime": "torchscript"})
        bench = manifest(f"benchmark:{pick['variant']}")
        forms[bs] = (pick["variant"], pick["runtime"],
                     served_file(ctx, bench, pick["runtime"], workdir / f"{pick['variant']}-{bs}"))
    return QpipeRun(summary, selected, reason, data, fp32, fp32_bench, int8_bench, load_torchscript(int8_path),
                    int8_path, calib, val, norm(data), spec.finetune.epochs, state_dict, seconds, forms,
                    own)


def served_file(ctx: StageContext, bench: dict, runtime: str, folder: Path) -> Path:
    """The file a benchmark manifest measured on ``runtime`` (an OpenVINO IR with its .bin beside
    it), fetched through its digest into ``folder``: the file ``qpipe pull`` hands a user."""
    uri = bench["runtimes"][runtime]["artifact"] if bench.get("runtimes") else bench["outputs"]["model"]["uri"]
    outputs = bench["outputs"]
    ref = next(r for r in outputs.values() if isinstance(r, dict) and r.get("uri") == uri)
    folder.mkdir(parents=True, exist_ok=True)
    path = ctx.fetch(ref, str(folder.relative_to(ctx.workdir) / Path(uri).name))
    if path.suffix == ".xml":
        ctx.fetch(outputs["weights"], str(folder.relative_to(ctx.workdir) / Path(outputs["weights"]["uri"]).name))
    return path


def form_runner(q: QpipeRun, bs: str, n_threads: int, batch_size: int | None) -> Callable:
    """A freshly loaded runner of what qpipe serves at batch ``bs``, loaded as a user loads the
    pulled file: an OpenVINO IR by ``Core.read_model`` with no qpipe code in between."""
    _, runtime, path = q.forms[bs]
    return file_runner(runtime, path, n_threads, batch_size)


# -------------------------------------------------------------------------------- the peers

def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> str:
    """fp32 ONNX with a dynamic batch dimension, one self-contained file. The dynamo exporter
    (torch.export + onnxscript) is tried first; the TorchScript-based one is the fallback."""
    model = model.cpu().eval()
    try:
        torch.onnx.export(model, example, str(path), dynamo=True, external_data=False, optimize=True,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False)
        return "torch.onnx.export(dynamo=True)"
    except Exception as err:  # noqa: BLE001 - any exporter failure falls back, and says so
        log(f"dynamo ONNX export failed ({type(err).__name__}: {str(err)[:200]}); using dynamo=False")
    torch.onnx.export(model, example, str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return "torch.onnx.export(dynamo=False)"


def calibration_batches(calib: torch.Tensor, mean_std: dict, batch_size: int) -> Iterator[torch.Tensor]:
    """The calibration images, normalised like every other input, in batches."""
    for start in range(0, len(calib), batch_size):
        yield normalize(calib[start:start + batch_size], **mean_std)


def quantize_ort(fp32_onnx: Path, out: Path, calib: torch.Tensor, mean_std: dict) -> dict:
    """ONNX Runtime static quantization: QDQ, per-channel int8 weights, uint8 activations
    (the pairing ORT's x86 int8 kernels are fast for), MinMax calibration."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = ({"input": x.numpy()} for x in calibration_batches(calib, mean_std, 32))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    pre.unlink()
    return {"format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8",
            "calibration": "MinMax", "pre_process": "quant_pre_process"}


def quantize_nncf(model: torch.nn.Module, example: tuple[torch.Tensor, ...], out_xml: Path, calib: torch.Tensor,
                  mean_std: dict) -> tuple[Any, dict]:
    """NNCF PTQ on the OpenVINO model of ``model``; saves IR at ``out_xml``, returns the fp32
    OpenVINO model (for the conversion check) and the settings used."""
    import nncf
    import openvino as ov

    size = example[0].shape[-1]
    fp32_ov = ov.convert_model(model.cpu().eval(), example_input=example[0], input=[(-1, 3, size, size)])
    items = [x.numpy() for x in calibration_batches(calib, mean_std, 1)]
    q = nncf.quantize(fp32_ov, nncf.Dataset(items), subset_size=len(items))
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
    return fp32_ov, {"api": "nncf.quantize", "subset_size": len(items), "preset": "default (performance for CNNs)",
                     "fast_bias_correction": True, "converted_by": "openvino.convert_model"}


def onnx_layers(path: Path) -> dict[str, int]:
    """Conv/Gemm/MatMul nodes of an ONNX model whose weight comes through DequantizeLinear (int8)."""
    import onnx

    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    int8 = sum(1 for n in layers if len(n.input) > 1 and n.input[1] in dequantized)
    return {"int8": int8, "fp32": len(layers) - int8}


def openvino_layers(xml: Path) -> dict[str, int]:
    """Convolution/MatMul ops of an IR whose weights are stored as int8 (or fake-quantized)."""
    import openvino as ov

    def quantized(node: Any) -> bool:
        for _ in range(8):  # weight chains are short: Constant(i8) -> Convert -> [Subtract] -> Multiply
            kind = node.get_type_name()
            if kind == "FakeQuantize" or (kind == "Constant" and str(node.get_output_element_type(0)) in (
                    "<Type: 'int8_t'>", "<Type: 'uint8_t'>")):
                return True
            if node.get_input_size() == 0:
                return False
            node = node.input_value(0).get_node()
        return False

    ops = [op for op in ov.Core().read_model(str(xml)).get_ops()
           if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
    int8 = sum(1 for op in ops if quantized(op.input_value(1).get_node()))
    return {"int8": int8, "fp32": len(ops) - int8}


# --------------------------------------------------------------------------------- measuring

def accuracy(model: Callable[[torch.Tensor], torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
             mean_std: dict) -> float:
    return evaluate(model, val[0], val[1], batch_size=64, **mean_std)["accuracy"]


def interleaved(forms: dict[int, dict[str, Callable[[], Callable]]], inputs: dict[int, torch.Tensor],
                args: argparse.Namespace, label: str) -> dict[int, dict[str, list[dict]]]:
    """``results[batch][form]``: one latency measurement per round, forms rotated each round.
    ``forms[batch][form]`` loads that form for that batch size: every round times a freshly
    loaded instance. One loaded instance keeps a speed of its own: the same OpenVINO IR loaded
    twice in one process ran 3 to 7% apart, round after round (memory placement; measured here),
    which a comparison of instances loaded once would report as a difference between forms."""
    results: dict[int, dict[str, list[dict]]] = {bs: {f: [] for f in forms[bs]} for bs in inputs}
    for r in range(args.rounds):
        for bs, x in inputs.items():
            names = list(forms[bs])
            for name in names[r % len(names):] + names[:r % len(names)]:
                instance = forms[bs][name]()
                results[bs][name].append(measure(instance, x, args))
                del instance
            load = round_load(results[bs], -1)
            log(f"{label} round {r + 1}/{args.rounds} batch {bs}: p50 ms "
                + ", ".join(f"{n} {results[bs][n][-1]['p50_ms']:.2f}" for n in names)
                + (f" (other processes: {load:.0%} of the CPUs)" if load is not None else ""))
    return results


def latency_forms(q: QpipeRun, ov_xml: Path, ort_path: Path, n_threads: int,
                  bs: int) -> dict[str, Callable[[], Callable]]:
    """How to load each int8 model for one batch size, freshly each time (``interleaved``).
    ``qpipe`` is what qpipe's report chose for that batch size (a variant on a runtime);
    ``qpipe_torchscript`` is the selected variant's TorchScript file. The first call's shape
    matters: qpipe's TorchScript int8 (oneDNN kernels) first called at batch 64 runs batch 1
    about 2x slower afterwards, so every instance is first called at the batch it serves, as a
    service with a fixed batch would, and ``qpipe_after_eval`` times the one instance that ran
    the accuracy pass at batch 64 first."""
    forms = {QPIPE: lambda: form_runner(q, str(bs), n_threads, bs),
             NNCF: lambda: OvRunner(ov_xml, n_threads, bs),
             ORT: lambda: OrtRunner(ort_path, n_threads),
             QPIPE_TORCHSCRIPT: lambda: load_torchscript(q.int8_path),
             QPIPE_AFTER_EVAL: lambda: q.int8}
    if q.own is not None:  # qpipe's own export on OpenVINO, whatever the report served
        forms[QPIPE_OWN] = lambda: file_runner("openvino", q.own[1], n_threads, bs)
    return forms


def round_ratios(per_form: dict[str, list[dict]], peers: tuple[str, ...] = PEERS,
                 rounds: list[int] | None = None, form: str = QPIPE) -> list[float]:
    """``form``'s p50 (qpipe's, by default) over the fastest peer's p50 in each round."""
    idx = range(len(per_form[form])) if rounds is None else rounds
    return [per_form[form][r]["p50_ms"] / min(per_form[p][r]["p50_ms"] for p in peers) for r in idx]


def fastest_peer_ratios(per_form: dict[str, list[dict]], peers: tuple[str, ...] = PEERS,
                        rounds: list[int] | None = None, form: str = QPIPE) -> float | None:
    """Median over rounds of ``round_ratios``."""
    ratios = round_ratios(per_form, peers, rounds, form)
    return statistics.median(ratios) if ratios else None


def slower_p_value(ratios: list[float]) -> float | None:
    """One-sided sign test over interleaved rounds: the probability that qpipe would be faster in
    this few rounds (or fewer) if it and the fastest peer were equally fast (each round a fair
    coin; rounds with a ratio of exactly 1 are left out, as the sign test does). Small: qpipe is
    measurably slower. A sum of binomial terms, written here rather than taken from scipy, which
    the bench needs for nothing else."""
    if not ratios:
        return None
    n, wins = sum(r != 1 for r in ratios), sum(r < 1 for r in ratios)
    return sum(math.comb(n, i) for i in range(wins + 1)) / 2 ** n


def judge(ratio: float | None, target: float, aim: float, ratios: list[float] | None = None,
          alpha: float = 0.05) -> dict[str, Any]:
    """The verdict on one cell: ``met`` when the median ratio is within ``target``; with the
    per-round ``ratios``, also how many rounds qpipe won, the sign test's p-value
    (``slower_p_value``) and ``verdict``: met, tie (missed by the median, yet not measurably
    slower at ``alpha``: a difference within this machine's round-to-round noise) or slower."""
    if ratio is None:
        return {"ratio": None, "met": None, "aim_met": None}
    out = {"ratio": round(ratio, 3), "met": ratio <= target, "aim_met": ratio <= aim,
           "margin": round(target - ratio, 3)}
    if ratios:
        p = slower_p_value(ratios)
        out |= {"rounds_faster": f"{sum(r < 1 for r in ratios)}/{len(ratios)}", "slower_p": round(p, 4),
                "verdict": "met" if ratio <= target else "slower" if p < alpha else "tie"}
    return out


def drop_verdict(drops: dict[str, float], images: int) -> dict[str, Any]:
    """qpipe's top-1 drop against NNCF's, in points and in validation images; met when qpipe's
    is no larger than NNCF's plus one validation image (the resolution of the comparison)."""
    diff = drops[QPIPE] - drops[NNCF]
    return {"qpipe_drop": round(drops[QPIPE], 4), "nncf_drop": round(drops[NNCF], 4),
            "qpipe_minus_nncf": round(diff, 4), "qpipe_minus_nncf_images": round(diff * images),
            "met": round(diff * images) <= 1}


def summarise(per_form: dict[str, list[dict]]) -> dict[str, Any]:
    return {name: {"p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
                   "p95_ms": round(statistics.median(r["p95_ms"] for r in rs), 3),
                   "p50_ms_per_round": [round(r["p50_ms"], 3) for r in rs],
                   "samples": sum(r["samples"] for r in rs)}
            for name, rs in per_form.items()}


def run_case(case: Case, args: argparse.Namespace, store: Store, workdir: Path,
             init: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """Run qpipe and both peers for one case; returns its JSON and its fp32 checkpoint file."""
    spec = case_spec(case, args, init=init)
    log(f"{case.name}: qpipe pipeline in process ({spec['finetune']['epochs']} epoch(s) from "
        f"{'the ' + str(case.init_from) + ' checkpoint' if init else 'random weights'})")
    q = run_qpipe(spec, store, workdir)
    log(f"{case.name}: qpipe done in {q.seconds:.0f}s, selected {q.selected}; building the peers")
    example = example_input(q.data)
    calib_n, val_n = len(q.calib), len(q.val[1])
    facts: dict[str, Any] = {"build_s": {}}

    t0 = time.perf_counter()
    fp32_onnx = workdir / "fp32.onnx"
    exporter = export_onnx(q.fp32, example, fp32_onnx)
    facts["build_s"]["onnx_export"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ort_path = workdir / "ort-int8.onnx"
    ort_settings = quantize_ort(fp32_onnx, ort_path, q.calib, q.mean_std)
    facts["build_s"][ORT] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ov_xml = workdir / "nncf-int8.xml"
    fp32_ov, nncf_settings = quantize_nncf(q.fp32, example, ov_xml, q.calib, q.mean_std)
    facts["build_s"][NNCF] = round(time.perf_counter() - t0, 1)
    import openvino as ov

    fp32_xml = workdir / "fp32.xml"
    ov.save_model(fp32_ov, str(fp32_xml), compress_to_fp16=False)

    first = str(args.batch_sizes[0])  # qpipe's accuracy and size: the form serving the first batch size
    first_variant, first_runtime, first_path = q.forms[first]
    int8 = {QPIPE: form_runner(q, first, args.threads, None),
            NNCF: OvRunner(ov_xml, args.threads), ORT: OrtRunner(ort_path, args.threads)}
    sizes = {QPIPE: first_path.stat().st_size + (first_path.with_suffix(".bin").stat().st_size
                                                 if first_path.suffix == ".xml" else 0),
             NNCF: ov_xml.stat().st_size + ov_xml.with_suffix(".bin").stat().st_size,
             ORT: ort_path.stat().st_size}
    fp32_sizes = {"torchscript": q.fp32_bench["metrics"]["size_bytes"], "onnx": fp32_onnx.stat().st_size,
                  "openvino_ir": fp32_xml.stat().st_size + fp32_xml.with_suffix(".bin").stat().st_size}

    with threads(args.threads):
        log(f"{case.name}: top-1 on {val_n} validation images")
        fp32_acc = accuracy(q.fp32, q.val, q.mean_std)
        acc = {name: accuracy(fn, q.val, q.mean_std) for name, fn in int8.items()}
        conversion = {"pytorch": fp32_acc,
                      "onnxruntime": accuracy(OrtRunner(fp32_onnx, args.threads), q.val, q.mean_std),
                      "openvino": accuracy(OvRunner(fp32_ov, args.threads), q.val, q.mean_std)}
        gen = torch.Generator().manual_seed(args.seed)
        inputs = {}
        for bs in args.batch_sizes:
            idx = torch.randint(0, val_n, (bs,), generator=gen)
            inputs[bs] = normalize(q.val[0][idx], **q.mean_std)
        log(f"{case.name}: timing {list(int8) + [QPIPE_TORCHSCRIPT, QPIPE_AFTER_EVAL]} at batch sizes "
            f"{args.batch_sizes}, {args.threads} thread(s), {args.rounds} rounds")
        results = interleaved({bs: latency_forms(q, ov_xml, ort_path, args.threads, bs) for bs in inputs}, inputs,
                              args, case.name)

    drops = {name: fp32_acc - a for name, a in acc.items()}
    latency = {str(bs): summarise(per_form) for bs, per_form in results.items()}
    layers = {QPIPE: {"int8": q.int8_bench.get("int8_layers"), "fp32": q.int8_bench.get("fp32_layers")},
              NNCF: openvino_layers(ov_xml), ORT: onnx_layers(ort_path)}
    runtimes = {QPIPE: "per batch size, as selected: " + ", ".join(f"@{bs} {v} on {rt}" for bs, (v, rt, _)
                                                                   in q.forms.items()),
                NNCF: f"OpenVINO {ov.__version__.split('-')[0]} CPU (precision hint {int8[NNCF].precision})",
                ORT: f"ONNX Runtime {__import__('onnxruntime').__version__} CPUExecutionProvider"}
    qpipe_format = {".xml": "OpenVINO IR (.xml + .bin)", ".onnx": "ONNX QDQ (.onnx)", ".ts": "TorchScript (.ts)"}
    formats = {QPIPE: f"{qpipe_format.get(first_path.suffix, first_path.suffix)} of {first_variant} at batch {first}",
               NNCF: "OpenVINO IR (.xml + .bin)", ORT: "ONNX QDQ (.onnx)"}
    rows = {"fp32": {"runtime": "PyTorch eager (checkpoint); latency: qpipe's benchmark stage, TorchScript",
                     "top1": round(fp32_acc, 4), "top1_by_runtime": {k: round(v, 4) for k, v in conversion.items()},
                     "latency_ms_p50": q.fp32_bench["metrics"]["latency_ms_p50"], "size_bytes": fp32_sizes}}
    for name in int8:
        rows[name] = {"runtime": runtimes[name], "format": formats[name], "top1": round(acc[name], 4),
                      "drop_vs_fp32": round(drops[name], 4),
                      "latency_ms_p50": {bs: latency[bs][name]["p50_ms"] for bs in latency},
                      "latency_ms_p95": {bs: latency[bs][name]["p95_ms"] for bs in latency},
                      "size_bytes": sizes[name], "size_vs_fp32": round(sizes[name] / fp32_sizes["torchscript"], 4),
                      "layers": layers[name]}
    rows[QPIPE]["latency_ms_p50_after_eval"] = {bs: latency[bs][QPIPE_AFTER_EVAL]["p50_ms"] for bs in latency}
    rows[QPIPE]["latency_ms_p50_torchscript"] = {bs: latency[bs][QPIPE_TORCHSCRIPT]["p50_ms"] for bs in latency}
    rows[QPIPE]["served_by"] = {bs: {"variant": v, "runtime": rt} for bs, (v, rt, _) in q.forms.items()}
    rows[QPIPE]["variant"] = q.selected
    rows[QPIPE]["artifact"] = {k: q.int8_bench["outputs"]["model"][k] for k in ("uri", "sha256")}
    rows[QPIPE]["method"] = q.int8_bench.get("method")
    rows[QPIPE]["top1_in_qpipe_benchmark_stage"] = q.int8_bench["metrics"]["accuracy_top1"]
    rows[NNCF]["settings"] = nncf_settings
    rows[ORT]["settings"] = {**ort_settings, "exporter": exporter}

    loads = {bs: [round_load(per_form, r) for r in range(args.rounds)] for bs, per_form in results.items()}
    quiet = {bs: [r for r, v in enumerate(ls) if v is not None and v < args.quiet_threshold]
             for bs, ls in loads.items()}
    ratios: dict[str, Any] = {"qpipe_vs_fastest_peer": {}, "qpipe_vs_peer": {}, "qpipe_after_eval_vs_fresh": {}}
    for bs, per_form in results.items():
        fastest = min(PEERS, key=lambda p: latency[str(bs)][p]["p50_ms"])
        per_round = round_ratios(per_form)
        ratios["qpipe_vs_fastest_peer"][str(bs)] = {
            **judge(statistics.median(per_round), args.target_ratio, args.aim_ratio, per_round),
            "fastest_peer": fastest}
        ratios["qpipe_vs_peer"][str(bs)] = {p: round(median_ratio(per_form[QPIPE], per_form[p]), 3) for p in PEERS}
        ratios["qpipe_after_eval_vs_fresh"][str(bs)] = round(median_ratio(per_form[QPIPE_AFTER_EVAL],
                                                                          per_form[QPIPE_TORCHSCRIPT]), 3)
        ratios.setdefault("qpipe_torchscript_vs_fastest_peer", {})[str(bs)] = round(
            fastest_peer_ratios(per_form, form=QPIPE_TORCHSCRIPT), 3)
    ratios["accuracy_drop_vs_nncf"] = drop_verdict(drops, val_n)
    if q.own is not None:  # target: qpipe's own export on OpenVINO within OWN_EXPORT_TARGET of NNCF's
        ratios["qpipe_own_export_vs_nncf"] = {
            str(bs): {"variant": q.own[0], "ratio": round(median_ratio(per_form[QPIPE_OWN], per_form[NNCF]), 3),
                      "met": median_ratio(per_form[QPIPE_OWN], per_form[NNCF]) <= OWN_EXPORT_TARGET}
            for bs, per_form in results.items()}
    noise = {"other_load_per_round": {str(bs): [None if v is None else round(v, 3) for v in ls]
                                      for bs, ls in loads.items()},
             "quiet_rounds": {str(bs): len(rs) for bs, rs in quiet.items()},
             "qpipe_vs_fastest_peer_quiet_rounds": {
                 str(bs): (round(fastest_peer_ratios(results[bs], rounds=rs), 3) if rs else None)
                 for bs, rs in quiet.items()}}
    if any(len(rs) < (args.rounds + 1) // 2 for rs in quiet.values()):
        noise["warning"] = "other processes were busy during most rounds: latencies and ratios are unreliable"
    return {
        "arch": case.arch,
        "image_size": case.image_size,
        "weights": (f"{case.arch} fine-tuned by qpipe's finetune stage on builtin:digits at "
                    f"{case.image_size}x{case.image_size} for {q.epochs} epoch(s) from "
                    + (f"the {case.init_from} fp32 checkpoint" if init else "random init")),
        "data": {"val_images": val_n, "calibration_images": calib_n,
                 "calibration": "the ingest stage's calib shard (seeded draw from the train split)",
                 "classes": len(q.data["classes"])},
        "qpipe": {"selected": q.selected, "selection_reason": q.selection, "run_id": q.summary["run_id"],
                  "status": q.summary["status"], "pipeline_s": round(q.seconds, 1),
                  "cached_stages": q.summary.get("cached_stages"),
                  "variants": {v["name"]: {"method": v.get("method"), "top1": v.get("accuracy_top1"),
                                           "latency_ms_p50": v.get("latency_ms_p50"), "runtime": v.get("runtime"),
                                           "runtimes": {rt: {"top1": m["accuracy_top1"],
                                                             "latency_ms_p50": m["latency_ms_p50"]}
                                                        for rt, m in (v.get("runtimes") or {}).items()},
                                           "skipped_runtimes": v.get("skipped_runtimes")}
                               for v in q.summary["variants"]}},
        "rows": rows,
        "ratios": ratios,
        "targets": {"own_export_vs_nncf": {bs: r["met"] for bs, r in ratios.get("qpipe_own_export_vs_nncf",
                                                                                {}).items()},
                    "latency": {bs: r["met"] for bs, r in ratios["qpipe_vs_fastest_peer"].items()},
                    "latency_not_measurably_slower": {bs: r["verdict"] != "slower"
                                                      for bs, r in ratios["qpipe_vs_fastest_peer"].items()},
                    "latency_aim": {bs: r["aim_met"] for bs, r in ratios["qpipe_vs_fastest_peer"].items()},
                    "accuracy": ratios["accuracy_drop_vs_nncf"]["met"] if case.judge_accuracy else None},
        "latency_ms": latency,
        "noise": noise,
        "build_s": facts["build_s"],
    }, q.state_dict


def overall(results: dict[str, dict]) -> dict[str, Any]:
    """Every judged target of every case, and whether all are met."""
    latency = {f"{name} batch {bs}": r["targets"]["latency"][bs] for name, r in results.items()
               for bs in r["targets"]["latency"]}
    aim = {f"{name} batch {bs}": r["targets"]["latency_aim"][bs] for name, r in results.items()
           for bs in r["targets"]["latency_aim"]}
    acc = {name: r["targets"]["accuracy"] for name, r in results.items() if r["targets"]["accuracy"] is not None}
    own = {f"{name} batch {bs}": met for name, r in results.items()
           for bs, met in r["targets"].get("own_export_vs_nncf", {}).items()}
    not_slower = {f"{name} batch {bs}": ok for name, r in results.items()
                  for bs, ok in r["targets"].get("latency_not_measurably_slower", {}).items()}
    return {"latency_no_slower_than_fastest_peer": latency, "latency_not_measurably_slower": not_slower,
            "latency_aim": aim, "drop_no_larger_than_nncf": acc,
            "own_export_within_1.05x_of_nncf": own,
            "all_met": all(v is True for v in (*latency.values(), *acc.values(), *own.values()))}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """Send everything written to file descriptor 1 (Python's and native libraries' prints, the
    peers' progress bars) to stderr, and yield a stream to the real stdout for the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(saved, "w", closefd=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # where sys.stdout is not fd 1 (captured, wrapped)
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        real.close()


def missing_peers() -> list[str]:
    import importlib.util

    return [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_peers()
    if missing:
        print(f"bench/peers.py needs the 'peers' extra ({', '.join(missing)} missing): "
              "pip install -e '.[peers]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started = time.perf_counter()
    import torchvision

    with stdout_to_stderr() as out, tempfile.TemporaryDirectory(prefix="qpipe-peers-") as tmp:
        store = FileStore(args.store or Path(tmp) / "store")
        results, checkpoints = {}, {}
        for case in cases(args):
            workdir = Path(tmp) / case.name.replace("@", "-")
            workdir.mkdir()
            init = checkpoints.get(case.init_from) if case.init_from else None
            results[case.name], checkpoints[case.name] = run_case(case, args, store, workdir, init)
        import nncf
        import onnxruntime
        import openvino

        report = {
            "benchmark": "peers",
            "cases": list(results),
            "threads": args.threads,
            "batch_sizes": args.batch_sizes,
            "targets": {"latency_ratio_max": args.target_ratio, "latency_ratio_aim": args.aim_ratio,
                        "drop": "qpipe's top-1 drop vs fp32 <= NNCF's + one validation image", **overall(results)},
            "results": results,
            "method": {"rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
                       "max_seconds": args.max_seconds, "quiet_threshold": args.quiet_threshold,
                       "statistic": "median over interleaved rounds of per-round p50/p95; ratios are medians of "
                                    "per-round ratios; the fastest peer is taken per round"},
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                         "nncf": nncf.__version__, "python": platform.python_version()},
            "quick": args.quick,
            "cpu": cpu_info(),
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(report, indent=2), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
