"""sensitivity (cpu): one part of the per-layer sensitivity analysis of a static variant.

The plan splits the layers into ``parts`` parts (dealt round-robin, ``pipeline.sensitivity.
part_layers``), one task each, fanned out as a chord over the cpu workers; the variant's quantize
stage joins the parts into one ranking. Each part converts the stored calibration twice per
layer, with that layer alone in int8 and with all but that layer in int8, and measures top-1 on
the validation split and the logits' SQNR against fp32 (see ``pipeline.sensitivity``). Every part
also records the fp32 and all-int8 top-1, so the join can check that the parts agree."""

from __future__ import annotations

import torch

from pipeline.quant import calibrated, convert_calibrated
from pipeline.sensitivity import json_db, logits_of, measure, part_layers, sqnr_db, top1
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, load_fp32, load_split, norm
from pipeline.stages.configs import ConvertConfig, SensitivityConfig
from pipeline.train import normalize


def calibrated_model(ctx: StageContext, cfg: ConvertConfig, inputs: dict):
    """The fp32 model and its calibrated observed graph, as the quantize stage builds them."""
    data, fp32 = inputs["data"], inputs["model"]
    model = load_fp32(ctx, fp32, data)
    path = ctx.fetch(inputs["calibration"]["outputs"]["observers"], "observers.pt")
    observed = calibrated(model, example_input(data), torch.load(path, weights_only=True),
                          observer=cfg.observer, per_channel=cfg.per_channel, backend=cfg.backend,
                          arch=cfg.arch, percentile=cfg.percentile,
                          activations=cfg.activations or "asymmetric")  # None: a node planned before the option
    return model, observed


def validation(ctx: StageContext, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    xv, yv = load_split(ctx, data, "val")
    return normalize(xv, **norm(data)), yv


def sensitivity(ctx: StageContext, cfg: SensitivityConfig, inputs: dict) -> dict:
    model, observed = calibrated_model(ctx, cfg, inputs)
    x, y = validation(ctx, inputs["data"])
    layers = part_layers(observed, cfg.part, cfg.parts)
    ctx.progress(0.0, "fp32 and all-int8 references")
    fp32 = logits_of(model, x)
    int8 = logits_of(convert_calibrated(observed), x)
    ctx.images(2 * len(y), "eval")

    def on_layer(i: int, layer: str) -> None:
        ctx.progress(i / max(len(layers), 1), f"layer {i + 1}/{len(layers)} {layer}")
        ctx.check_cancelled(every=0.0)
        ctx.images(2 * len(y), "eval")

    rows = measure(observed, layers, x, y, fp32, on_layer=on_layer, timed=cfg.latency)
    return {
        "part": cfg.part,
        "parts": cfg.parts,
        "val_images": len(y),
        "fp32_accuracy": top1(fp32, y),
        "int8_accuracy": top1(int8, y),
        "int8_sqnr_db": json_db(sqnr_db(fp32, int8)),
        "layers": rows,
    }
