"""quantize (cpu): convert the fp32 model to int8, from a stored calibration (static) or with
dynamic quantization, and record which layers run in int8.

A static variant chooses its activation ranges from the stored statistics with its observer
(and percentile), and with ``bias_correction`` shifts each int8 layer's bias by its mean output
error against fp32 on the calibration images (``pipeline.quant.correct_bias``)."""

from __future__ import annotations

import torch

from pipeline.quant import (
    BIAS_CORRECTION_IMAGES,
    convert_static,
    correct_bias,
    count_layers,
    export_torchscript,
    layer_table,
    quantize_dynamic,
)
from pipeline.stages import StageContext, register
from pipeline.stages.common import example_input, load_fp32, load_split, norm
from pipeline.train import normalize


@register("quantize", version=1, queue="cpu")
def quantize(ctx: StageContext, cfg: dict, inputs: dict) -> dict:
    data, fp32 = inputs["data"], inputs["model"]
    model = load_fp32(ctx, fp32, data)
    example = example_input(data)
    extra: dict = {}
    if cfg["method"] == "static":
        path = ctx.fetch(inputs["calibration"]["outputs"]["observers"], "observers.pt")
        observers = torch.load(path, weights_only=True)
        qmodel = convert_static(model, example, observers, observer=cfg["observer"], per_channel=cfg["per_channel"],
                                backend=cfg["backend"], arch=cfg["arch"], percentile=cfg.get("percentile"))
        if cfg.get("bias_correction"):
            ctx.progress(0.4, "bias correction")
            x = load_split(ctx, data, "calib")[0][:BIAS_CORRECTION_IMAGES]
            extra["bias_correction"] = correct_bias(qmodel, model, normalize(x, **norm(data)))
    else:
        qmodel = quantize_dynamic(model, example, backend=cfg["backend"], arch=cfg["arch"])
    ctx.progress(0.7, "exporting TorchScript")
    rows = layer_table(qmodel)
    int8, fp = count_layers(rows)
    path = export_torchscript(qmodel, example, ctx.workdir / "model.ts")
    return {
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "method": cfg["method"],
        "backend": cfg["backend"],
        "layers": rows,
        "int8_layers": int8,
        "fp32_layers": fp,
        "format": "torchscript",
        **extra,
        "outputs": {"model": ctx.put("model.ts", path)},
    }
