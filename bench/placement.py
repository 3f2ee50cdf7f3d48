"""qpipe's own int8 export against NNCF's on OpenVINO: activation quantizers per graph and
latency, the same network and calibration images on both sides.

What it measures
    For each arch (resnet18, mobilenet_v2, mobilenet_v3_large, efficientnet_b0 by default, at
    64x64, 10 classes): one network with random weights whose batch norms' running statistics
    are first set on random images (a random network's activations otherwise shrink or grow
    layer by layer and most ranges are degenerate; int8 latency and the graph do not depend on
    the weights' values). Both quantizers see the same ``--calib-images`` random images:

    * ``qpipe``: ``pipeline.quant.prepare_static`` + minmax calibration (per-channel weights,
      the x86 backend), exported by ``pipeline.runtimes.export_onnx_qdq`` and run by qpipe's
      OpenVINO runner (``openvino_model``: the file with each activation folded into its layer);
    * ``nncf``: ``nncf.quantize`` (defaults: performance preset, fast bias correction) on the
      OpenVINO model ``openvino.convert_model`` makes of the same network, saved as IR.

    Quantizers: activation quantizers of each graph, the weights' excluded: QuantizeLinear
    nodes of qpipe's .onnx (what ONNX Runtime runs), FakeQuantize nodes of the model qpipe's
    OpenVINO runner compiles, FakeQuantize nodes of NNCF's IR whose input is not a constant.

    Latency: p50 at each batch size with ``--threads`` threads, OpenVINO compiled for that static
    batch on both sides, each loaded afresh in each round (``bench.peers.interleaved``: one
    loaded instance keeps a speed of its own); ``--rounds`` interleaved rounds (order rotated each round), the ratio
    is the median over rounds of qpipe's p50 over NNCF's in the same round. Each round records
    the share of the CPUs other processes used meanwhile, and the ratio is given over the quiet
    rounds (under ``--quiet-threshold``) too.

Output
    One JSON object on stdout: per arch the counts, p50s and ratios, and whether the ratio is
    within ``--target-ratio`` (1.05) at every batch size. Never an error on a missed target;
    exit status 2 when nncf or openvino is missing.

    .venv/bin/python -m bench.placement
    .venv/bin/python -m bench.placement --archs mobilenet_v2 --rounds 9
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.int8_vs_fp32 import add_timing_args, cpu_info, median_ratio, parse_batch_sizes, round_load
from bench.peers import interleaved, stdout_to_stderr
from pipeline.bench import threads
from pipeline.models import build_model
from pipeline.quant import calibrated, observer_state, prepare_static
from pipeline.runtimes import OvRunner, export_onnx_qdq, openvino_model

ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
FORMS = ("qpipe", "nncf")


def log(msg: str) -> None:
    print(f"[placement {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated torchvision archs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 32], help="comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-images", type=int, default=64, help="random calibration images, the same for both")
    p.add_argument("--target-ratio", type=float, default=1.05, help="qpipe / NNCF latency on OpenVINO, at most")
    p.add_argument("--seed", type=int, default=0)
    add_timing_args(p, warmup=5)
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not args.archs:
        p.error("--archs: give at least one arch")
    for name in ("image_size", "threads", "calib_images", "rounds", "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def settle_batch_norms(model: nn.Module, size: int, generator: torch.Generator | None = None) -> nn.Module:
    """``model`` (random weights) in eval mode with its batch norms' running statistics set to
    a plain average over 4 batches of 16 random ``size`` x ``size`` images (drawn from
    ``generator``, or torch's global one): a random network's activations otherwise shrink or
    grow layer by layer, and most quantization ranges would be degenerate."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, size, size, generator=generator))
    return model.eval()


def network(arch: str, size: int, seed: int) -> nn.Module:
    """``arch`` with random weights and batch-norm statistics averaged over random images."""
    torch.manual_seed(seed)
    return settle_batch_norms(build_model(arch, 10), size)


def qpipe_export(model: nn.Module, arch: str, images: torch.Tensor, path: Path) -> Path:
    example = (images[:1],)
    observing = prepare_static(model, example, observer="minmax", per_channel=True, backend="x86", arch=arch)
    with torch.no_grad():
        for x in torch.split(images, 16):
            observing(x)
    observed = calibrated(model, example, observer_state(observing), observer="minmax", per_channel=True,
                          backend="x86", arch=arch)
    return export_onnx_qdq(observed, example, path)


def nncf_ir(model: nn.Module, images: torch.Tensor, xml: Path) -> Path:
    import nncf
    import openvino as ov

    size = images.shape[-1]
    fp32 = ov.convert_model(model, example_input=images[:1], input=[(-1, 3, size, size)])
    items = [x.numpy() for x in torch.split(images, 1)]
    ov.save_model(nncf.quantize(fp32, nncf.Dataset(items), subset_size=len(items)), str(xml), compress_to_fp16=False)
    return xml


def activation_fake_quantizers(model: Any) -> int:
    return sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
               and op.input_value(0).get_node().get_type_name() != "Constant")


def quantizers(onnx_path: Path, xml: Path) -> dict[str, int]:
    import onnx
    import openvino as ov

    graph = onnx.load(str(onnx_path)).graph
    constants = {t.name for t in graph.initializer}
    return {"qpipe_onnx": sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants),
            "qpipe_openvino": activation_fake_quantizers(openvino_model(onnx_path)),
            "nncf_openvino": activation_fake_quantizers(ov.Core().read_model(str(xml)))}


def run_arch(arch: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = network(arch, args.image_size, args.seed)
    images = torch.randn(args.calib_images, 3, args.image_size, args.image_size, generator=gen)
    log(f"{arch}: exporting qpipe's int8 model and quantizing with NNCF on {len(images)} images")
    files = {"qpipe": qpipe_export(model, arch, images, workdir / f"{arch}-qpipe.onnx"),
             "nncf": nncf_ir(model, images, workdir / f"{arch}-nncf.xml")}
    counts = quantizers(files["qpipe"], files["nncf"])
    log(f"{arch}: activation quantizers {counts}")
    inputs = {bs: torch.randn(bs, 3, args.image_size, args.image_size, generator=gen) for bs in args.batch_sizes}
    loaders = {bs: {name: (lambda path=files[name], bs=bs: OvRunner(path, args.threads, bs)) for name in FORMS}
               for bs in args.batch_sizes}
    with threads(args.threads):  # a freshly loaded instance per form and round, as bench/peers.py times them
        results = interleaved(loaders, inputs, args, arch)
    ratios = {str(bs): round(median_ratio(per["qpipe"], per["nncf"]), 3) for bs, per in results.items()}
    loads = {bs: [round_load(per, r) for r in range(args.rounds)] for bs, per in results.items()}
    quiet = {bs: [r for r, v in enumerate(ls) if v is not None and v < args.quiet_threshold]
             for bs, ls in loads.items()}
    return {
        "activation_quantizers": counts,
        "latency_ms_p50": {str(bs): {n: round(statistics.median(m["p50_ms"] for m in per[n]), 3) for n in FORMS}
                           for bs, per in results.items()},
        "qpipe_vs_nncf": ratios,
        "within_target": {bs: r <= args.target_ratio for bs, r in ratios.items()},
        "p50_ms_per_round": {str(bs): {n: [round(m["p50_ms"], 3) for m in per[n]] for n in FORMS}
                             for bs, per in results.items()},
        "other_load_per_round": {str(bs): [None if v is None else round(v, 3) for v in ls] for bs, ls in loads.items()},
        "qpipe_vs_nncf_quiet_rounds": {str(bs): (round(median_ratio(results[bs]["qpipe"], results[bs]["nncf"], rs), 3)
                                                 if rs else None) for bs, rs in quiet.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    absent = [m for m in ("onnx", "onnxscript", "openvino", "nncf") if importlib.util.find_spec(m) is None]
    if absent:
        print(f"bench/placement.py needs {', '.join(absent)}: pip install -e '.[peers]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import nncf
    import openvino

    started = time.perf_counter()
    with stdout_to_stderr() as out, tempfile.TemporaryDirectory(prefix="qpipe-placement-") as tmp:
        archs = {arch: run_arch(arch, args, Path(tmp)) for arch in args.archs}
        report = {"benchmark": "placement", "image_size": args.image_size, "threads": args.threads,
                  "batch_sizes": args.batch_sizes, "target_ratio": args.target_ratio, "archs": archs,
                  "all_within_target": all(all(a["within_target"].values()) for a in archs.values()),
                  "method": {"rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
                             "max_seconds": args.max_seconds, "calib_images": args.calib_images},
                  "versions": {"torch": torch.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__},
                  "cpu": cpu_info(), "elapsed_s": round(time.perf_counter() - started, 1)}
        print(json.dumps(report, indent=2), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
