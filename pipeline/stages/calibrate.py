"""calibrate (cpu): run the calibration images through the observed model once per statistic
(``config.observer``: minmax, moving_average_minmax or histogram); the observer statistics
become an artifact that every static variant recording that statistic converts from. The
histogram serves the histogram, percentile, mse and entropy observers alike: they differ only
in the range they pick from it, at conversion (see ``pipeline.spec.CALIBRATION_STATISTIC``)."""

from __future__ import annotations

import torch

from pipeline.quant import observer_state, prepare_static
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, load_fp32, load_split, norm
from pipeline.stages.configs import CalibrateConfig
from pipeline.train import counting, evaluate


def calibrate(ctx: StageContext, cfg: CalibrateConfig, inputs: dict) -> dict:
    data, fp32 = inputs["data"], inputs["model"]
    model = load_fp32(ctx, fp32, data)
    observed = prepare_static(model, example_input(data), observer=cfg.observer, per_channel=True,
                              backend=cfg.backend, arch=cfg.arch)
    x, _ = load_split(ctx, data, "calib")

    def on_batch(done: int, total: int) -> None:
        ctx.progress(done / total, f"{min(done * 32, len(x))}/{len(x)} images")
        ctx.check_cancelled()

    evaluate(observed, x, None, batch_size=32, on_batch=counting(ctx, "calibrate", len(x), 32, on_batch), **norm(data))
    path = ctx.workdir / "observers.pt"
    torch.save(observer_state(observed), path)
    return {"observer": cfg.observer, "images": len(x), "outputs": {"observers": ctx.put("observers.pt", path)}}
