"""Helpers the stages share: loading a dataset's shards and a fine-tuned fp32 model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.data import read_shards
from pipeline.models import build_model, load_state_dict
from pipeline.stages import StageContext


def load_split(ctx: StageContext, data: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [ctx.fetch(ref, f"{split}-{i:05d}.pt") for i, ref in enumerate(data["outputs"][split])]
    x, y = read_shards(paths)
    for p in paths:
        p.unlink()
    return x, y


def example_input(data: dict, batch: int = 1) -> tuple[torch.Tensor]:
    crop = data["preprocess"]["crop"]
    return (torch.zeros(batch, 3, crop, crop),)


def load_fp32(ctx: StageContext, model_manifest: dict, data: dict) -> nn.Module:
    """The fine-tuned fp32 model from the finetune stage's state_dict."""
    path: Path = ctx.fetch(model_manifest["outputs"]["state_dict"], "fp32.pt")
    model = build_model(model_manifest["config"]["arch"], len(data["classes"]))
    model.load_state_dict(load_state_dict(path))
    return model.eval()


def norm(data: dict) -> dict:
    pre = data["preprocess"]
    return {"mean": pre["mean"], "std": pre["std"]}


def int8_result(ctx: StageContext, qmodel: nn.Module, example: tuple[torch.Tensor, ...],
                outputs: dict) -> dict:
    """The part of the quantize and qat manifests that describes their int8 model: which layers
    run in int8, and the model itself as TorchScript (``outputs["model"]``) next to ``outputs``."""
    from pipeline.quant import count_layers, export_torchscript, layer_table

    rows = layer_table(qmodel)
    int8, fp = count_layers(rows)
    path = export_torchscript(qmodel, example, ctx.workdir / "model.ts")
    return {"layers": rows, "int8_layers": int8, "fp32_layers": fp, "format": "torchscript",
            "outputs": {"model": ctx.put("model.ts", path), **outputs}}
