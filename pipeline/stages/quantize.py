"""quantize (cpu): convert the fp32 model to int8, from a stored calibration (static) or with
dynamic quantization, and record which layers run in int8.

A static variant chooses its activation ranges from the stored statistics with its observer
(and percentile), and with ``bias_correction`` shifts each int8 layer's bias by its mean output
error against fp32 on the calibration images (``pipeline.quant.correct_bias``).

With ``sensitivity`` the stage joins the parts of the per-layer sensitivity analysis (the
``sensitivity_*`` inputs) into one ranking. With ``fallback: auto`` it then keeps the most
sensitive layers in fp32, fewest first, until the top-1 drop on the validation split is within
``accuracy_budget`` (``pipeline.sensitivity.search_fallback``), and stores the all-int8 model
next to the result so the benchmark can measure what the kept layers cost in latency."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.errors import StageError
from pipeline.quant import (
    BIAS_CORRECTION_IMAGES,
    convert_calibrated,
    correct_bias,
    count_layers,
    export_torchscript,
    layer_table,
    quantize_dynamic,
)
from pipeline.runtimes import export_onnx_qdq, int8_biases
from pipeline.sensitivity import logits_of, rank, search_fallback, top1
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, load_fp32, load_split, norm
from pipeline.stages.configs import QuantizeConfig
from pipeline.stages.sensitivity import calibrated_model, validation
from pipeline.train import normalize

log = logging.getLogger(__name__)


def join_sensitivity(inputs: dict, parts: int) -> dict:
    """The parts of the sensitivity analysis (``pipeline.stages.sensitivity``) as one ranking."""
    got = [inputs[f"sensitivity_{i}"] for i in range(parts)]
    for key in ("fp32_accuracy", "int8_accuracy"):
        if len({g[key] for g in got}) != 1:
            raise StageError(f"the sensitivity parts disagree on {key} ({sorted({g[key] for g in got})}): "
                             "they should all see the same calibration and model; rerun the variant")
    rows = [r for g in got for r in g["layers"]]
    return {"fp32_accuracy": got[0]["fp32_accuracy"], "int8_accuracy": got[0]["int8_accuracy"],
            "int8_sqnr_db": got[0]["int8_sqnr_db"], "val_images": got[0]["val_images"], "parts": parts,
            "method": "each layer alone in int8 (drop_top1, sqnr_db); all but that layer in int8 (all_but_*)",
            "ranking": rank(rows, got[0]["int8_accuracy"])}


def static_int8(ctx: StageContext, cfg: QuantizeConfig, inputs: dict) -> tuple[Any, dict, dict]:
    """method: static: convert from the stored calibration, with the variant's observer, bias
    correction, sensitivity join and fallback. Returns (int8 model, manifest fields, outputs)."""
    data = inputs["data"]
    example = example_input(data)
    extra: dict = {}
    outputs: dict = {}
    model, observed = calibrated_model(ctx, cfg, inputs)
    calib_x = None
    if cfg.bias_correction:
        calib_x = normalize(load_split(ctx, data, "calib")[0][:BIAS_CORRECTION_IMAGES], **norm(data))

    def convert(kept: list[str]):
        q = convert_calibrated(observed, kept)
        if calib_x is not None:
            return q, correct_bias(q, model, calib_x)
        return q, None

    kept: list[str] = []
    if cfg.sensitivity:
        extra["sensitivity"] = join_sensitivity(inputs, cfg.sensitivity)
    if cfg.fallback == "auto":
        x, y = validation(ctx, data)

        def accuracy_of(layers: list[str]) -> float:
            ctx.check_cancelled(every=0.0)
            ctx.images(len(y), "eval")
            return top1(logits_of(convert(layers)[0], x), y)

        def on_try(k: int, total: int) -> None:
            ctx.progress(0.6 * k / max(total, 1), f"fallback: {k} most sensitive layer(s) kept fp32")

        fb = search_fallback(extra["sensitivity"]["ranking"], accuracy_of,
                             fp32_accuracy=extra["sensitivity"]["fp32_accuracy"], budget=cfg.accuracy_budget,
                             on_try=on_try)
        kept = fb["kept_fp32"]
        extra["fallback"] = fb
        (log.info if fb["met"] else log.warning)("%s fallback: %s", cfg.variant, fb["message"])
    if calib_x is not None:
        ctx.progress(0.7, "bias correction")
    qmodel, bias = convert(kept)
    if bias is not None:
        extra["bias_correction"] = bias
    if cfg.export_onnx:  # the same int8 model as ONNX QDQ, for ONNX Runtime and OpenVINO
        ctx.progress(0.75, "exporting ONNX QDQ")
        try:
            onnx = export_onnx_qdq(observed, example, ctx.workdir / "model.onnx", kept,
                                   biases=int8_biases(qmodel) if bias and bias["applied"] else None)
            outputs["onnx"] = ctx.put("model.onnx", onnx)
        except StageError as err:  # the TorchScript form stands alone; the benchmark says why ONNX is absent
            extra["export_errors"] = {"onnx": str(err)}
            log.warning("%s: %s", cfg.variant, err)
    if kept:  # the all-int8 model too, so the benchmark can measure what the fallback costs
        ctx.progress(0.8, "exporting the all-int8 TorchScript")
        path = export_torchscript(convert([])[0], example, ctx.workdir / "all-int8.ts")
        outputs["all_int8"] = ctx.put("all-int8.ts", path)
    return qmodel, extra, outputs


def dynamic_int8(ctx: StageContext, cfg: QuantizeConfig, inputs: dict) -> tuple[Any, dict, dict]:
    """method: dynamic: int8 weights, activations quantized on the fly; nothing else to record."""
    data = inputs["data"]
    model = load_fp32(ctx, inputs["model"], data)
    return quantize_dynamic(model, example_input(data), backend=cfg.backend, arch=cfg.arch), {}, {}


# each method's conversion (a method's rules live in its function, not in branches of the stage)
CONVERTERS: dict[str, Callable[[StageContext, QuantizeConfig, dict], tuple[Any, dict, dict]]] = {
    "static": static_int8, "dynamic": dynamic_int8}


def quantize(ctx: StageContext, cfg: QuantizeConfig, inputs: dict) -> dict:
    data = inputs["data"]
    example = example_input(data)
    qmodel, extra, outputs = CONVERTERS[cfg.method](ctx, cfg, inputs)
    ctx.progress(0.9, "exporting TorchScript")
    rows = layer_table(qmodel)
    int8, fp = count_layers(rows)
    path = export_torchscript(qmodel, example, ctx.workdir / "model.ts")
    return {
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "method": cfg.method,
        "backend": cfg.backend,
        "layers": rows,
        "int8_layers": int8,
        "fp32_layers": fp,
        "format": "torchscript",
        **extra,
        "outputs": {"model": ctx.put("model.ts", path), **outputs},
    }
