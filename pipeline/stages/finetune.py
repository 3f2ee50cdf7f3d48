"""finetune (gpu queue; CPU where there is no CUDA): transfer learning of the fp32 baseline."""

from __future__ import annotations

import logging

from pipeline.models import build_model, head_of
from pipeline.quant import export_torchscript
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, load_split, norm
from pipeline.stages.configs import FinetuneConfig
from pipeline.train import device_record, pick_device, seed_everything, train_epochs, training_precision

log = logging.getLogger(__name__)


def finetune(ctx: StageContext, cfg: FinetuneConfig, inputs: dict) -> dict:
    import torch

    data = inputs["data"]
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    # mixed precision where there is CUDA; without it (device: auto on a CPU worker), fp32 and a note
    precision, precision_note = training_precision(cfg.precision, device)
    if precision_note:
        log.warning("%s: %s", ctx.stage, precision_note)
    weights, checkpoint = cfg.weights, None
    name = None
    if weights and weights["kind"] == "torchvision":
        name = weights["name"]
    elif weights:
        checkpoint = ctx.fetch(weights, "init.pt")
    model = build_model(cfg.arch, len(data["classes"]), weights=name, checkpoint=checkpoint,
                        checkpoint_name=weights.get("name") if weights else None)
    if cfg.freeze_backbone:
        head_name, _ = head_of(model)
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(head_name + ".")
    x, y = load_split(ctx, data, "train")
    xv, yv = load_split(ctx, data, "val")
    history = train_epochs(model, ctx, x, y, xv, yv, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           device=device, seed=cfg.seed, frozen_bn=cfg.freeze_backbone, precision=precision,
                           channels_last=True, recompute_slow_bn=True, **norm(data))
    model.cpu().eval()
    if device.type == "cuda":  # trained channels_last: exported and saved in the usual layout
        model.to(memory_format=torch.contiguous_format)
    sd_path = ctx.workdir / "model.pt"
    torch.save(model.state_dict(), sd_path)
    ts_path = export_torchscript(model, example_input(data), ctx.workdir / "model.ts")
    return {
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "history": history,
        "metrics": {"val_accuracy": history[-1]["val_accuracy"] if history else None},
        **device_record(device),
        "precision": precision,
        **({"precision_note": precision_note} if precision_note else {}),
        "resumed_from_epoch": ctx.extra.get("resumed_from_epoch", 0),
        "format": "torchscript",
        "outputs": {"state_dict": ctx.put("model.pt", sd_path), "model": ctx.put("model.ts", ts_path)},
    }
