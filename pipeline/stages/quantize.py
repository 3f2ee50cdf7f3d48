"""quantize (cpu): convert the fp32 model to int8, from a stored calibration (static) or with
dynamic quantization, and record which layers run in int8.

A static variant chooses its activation ranges from the stored statistics with its observer
(and percentile), and with ``bias_correction`` shifts each int8 layer's bias by its mean output
error against fp32 on the calibration images (``pipeline.quant.correct_bias``).

With ``sensitivity`` the stage joins the parts of the per-layer sensitivity analysis (the
``sensitivity_*`` inputs) into one ranking. With ``fallback: auto`` it then keeps the most
sensitive layers in fp32, fewest first, until the top-1 drop on the validation split is within
``accuracy_budget`` (``pipeline.sensitivity.search_fallback``), and stores the all-int8 model
next to the result so the benchmark can measure what the kept layers cost in latency.

A static variant of another engine (``engine: nncf`` or ``onnxruntime``) is quantized by that
engine instead (``engine_int8``, ``pipeline.engines``), from the fp32 model and the calibration
images, and stored as the engine wrote it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.engines import EngineModel, graph_counts, quantize_nncf, quantize_onnxruntime
from pipeline.errors import StageError
from pipeline.quant import (
    BIAS_CORRECTION_IMAGES,
    convert_calibrated,
    correct_bias,
    export_torchscript,
    quantize_dynamic,
)
from pipeline.runtimes import export_onnx_fp32, export_onnx_qdq, int8_biases
from pipeline.sensitivity import logits_of, rank, rank_by_latency, search_fallback, top1
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, int8_result, load_fp32, load_split, norm
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
    ranking = rank(rows, got[0]["int8_accuracy"])
    joined = {"fp32_accuracy": got[0]["fp32_accuracy"], "int8_accuracy": got[0]["int8_accuracy"],
              "int8_sqnr_db": got[0]["int8_sqnr_db"], "val_images": got[0]["val_images"], "parts": parts,
              "method": "each layer alone in int8 (drop_top1, sqnr_db); all but that layer in int8 (all_but_*)",
              "ranking": ranking}
    if rows and all("cost_ms" in r for r in rows):  # timed (fallback: latency): the second ranking
        joined["latency_ranking"] = rank_by_latency(ranking)
    return joined


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
    if cfg.fallback in ("auto", "latency"):
        x, y = validation(ctx, data)

        def accuracy_of(layers: list[str]) -> float:
            ctx.check_cancelled(every=0.0)
            ctx.images(len(y), "eval")
            return top1(logits_of(convert(layers)[0], x), y)

        def on_try(k: int, total: int) -> None:
            ctx.progress(0.6 * k / max(total, 1), f"fallback: {k} most sensitive layer(s) kept fp32")

        sens = extra["sensitivity"]
        if cfg.fallback == "latency" and "latency_ranking" not in sens:
            raise StageError("fallback: latency needs the sensitivity parts' latency costs, and they have none: "
                             "rerun the variant (its sensitivity parts are recomputed with timing)")
        order = "latency" if cfg.fallback == "latency" else "sensitivity"
        fb = search_fallback(sens["latency_ranking" if order == "latency" else "ranking"], accuracy_of,
                             fp32_accuracy=sens["fp32_accuracy"], budget=cfg.accuracy_budget, order=order,
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

# each other engine (pipeline.engines) with the options of the config it reads
# (the fp32 model, an example input, the calibration images, the output folder, the config)
ENGINES: dict[str, Callable[[Any, Any, Any, Path, QuantizeConfig], EngineModel]] = {
    "nncf": lambda fp32, example, calib, out, cfg: quantize_nncf(
        fp32, example, calib, out, preset=cfg.preset or "performance",
        fast_bias_correction=cfg.fast_bias_correction is not False),
    "onnxruntime": lambda fp32, example, calib, out, cfg: quantize_onnxruntime(
        export_onnx_fp32(fp32, (example,), out / "fp32.onnx"), calib, out, per_channel=cfg.per_channel,
        calibrate_method=cfg.calibrate_method or "minmax", preprocess=cfg.preprocess is not False),
}


def engine_int8(ctx: StageContext, cfg: QuantizeConfig, inputs: dict) -> dict:
    """Another engine's static int8 model: the fine-tuned model (NNCF converts it to OpenVINO,
    ONNX Runtime reads its fp32 ONNX export) and the ingest's calibration images (normalised as
    every input is) handed to ``cfg.engine``. The engine's model (OpenVINO IR, or an ONNX QDQ
    file) is the stage's whole result: it has no TorchScript form. The manifest counts its int8
    and float layers and its quantizers."""
    data = inputs["data"]
    ctx.progress(0.05, "loading the fp32 model")
    fp32 = load_fp32(ctx, inputs["model"], data)
    calib = normalize(load_split(ctx, data, "calib")[0], **norm(data)).numpy()
    ctx.check_cancelled(every=0.0)
    ctx.progress(0.3, f"{cfg.engine}: quantizing, calibrated on {len(calib)} images")
    made = ENGINES[cfg.engine](fp32, example_input(data)[0], calib, ctx.workdir, cfg)
    ctx.images(len(calib), "calibrate")
    outputs = {"model": ctx.put(made.path.name, made.path)}
    if made.weights is not None:
        outputs["weights"] = ctx.put(made.weights.name, made.weights)
    return {
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "method": cfg.method,
        "engine": cfg.engine,
        "format": made.format,
        "engine_settings": made.settings,
        **graph_counts(made.path, made.format),
        "layers": [],
        "outputs": outputs,
    }


def quantize(ctx: StageContext, cfg: QuantizeConfig, inputs: dict) -> dict:
    if cfg.engine != "qpipe":
        return engine_int8(ctx, cfg, inputs)
    data = inputs["data"]
    example = example_input(data)
    qmodel, extra, outputs = CONVERTERS[cfg.method](ctx, cfg, inputs)
    ctx.progress(0.9, "exporting TorchScript")
    result = int8_result(ctx, qmodel, example, outputs)
    return {
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "method": cfg.method,
        "backend": cfg.backend,
        **{k: v for k, v in result.items() if k != "outputs"},
        **extra,
        "outputs": result["outputs"],
    }
