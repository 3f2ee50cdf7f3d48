"""When a run's answer cannot be trusted, say so: checks over a finished run's summary.

A run can end SUCCESS and still mean nothing. ``warnings(summary)`` returns one entry per
problem found, each ``{"kind", "model", "message"}`` with what was seen and what to do:

- ``chance``: an fp32 baseline whose top-1 is not clearly above chance (1 / classes): the
  fine-tune did not learn, and the drops, the selection and the speedups compare noise.
  "Clearly above" is chance plus the larger of three standard errors of a guess on the
  validation split and chance itself (at most 0.1): 10 classes, 359 images: 0.200; 2 classes,
  20 images: 0.835;
- ``resolution``: a validation split so small that one image is worth more top-1 than the
  accuracy budget: the budget cannot tell a variant within it from one outside it;
- ``diverged``: a training loss that became NaN or infinite, or ended well above where it began
  (by half again and ``DIVERGED_NATS``).

The summary, the report and the CLI carry them (``summary["warnings"]``).
"""

from __future__ import annotations

import math
from typing import Any

# a loss that ends this many nats (and half again) above its first epoch's diverged; smaller rises
# are the noise of a short QAT or a fine-tune from a trained model
DIVERGED_NATS = 0.5


def chance_floor(classes: int, val_images: int) -> float:
    """The top-1 a model must exceed to be clearly better than guessing."""
    p = 1.0 / classes
    return p + max(3.0 * math.sqrt(p * (1.0 - p) / max(val_images, 1)), min(p, 0.1))


def _baselines(summary: dict[str, Any]) -> dict[str, dict]:
    found = summary.get("baselines") or {None: summary.get("baseline")}
    return {(f"fp32@{arch}" if arch else "fp32"): row for arch, row in found.items() if row}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def warnings(summary: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    data = summary.get("data") or {}
    classes, val = data.get("classes"), data.get("val")
    if classes and classes > 1 and val:
        floor = chance_floor(classes, val)
        for name, row in _baselines(summary).items():
            top1 = row.get("accuracy_top1")
            if top1 is not None and top1 < floor:
                out.append({"kind": "chance", "model": name, "message": (
                    f"{name} reaches top-1 {top1:.4f}, near chance for {classes} classes ({1 / classes:.4f}; "
                    f"clearly above it is {floor:.4f} on {val} validation images): the fine-tune did not learn, "
                    "so drops, the selection and speedups compare noise; train longer, change finetune.lr, or "
                    "start from pretrained weights (model.weights)")})
    budget = summary.get("accuracy_budget")
    if val and budget is not None and 1.0 / val > budget:
        out.append({"kind": "resolution", "model": "", "message": (
            f"the validation split has {val} images, so one image is worth {1 / val:.4f} top-1, more than the "
            f"accuracy budget of {budget:.4f}: the budget cannot separate a variant within it from one outside "
            "it; give more validation images (data.val_fraction or data.val_source) or a larger "
            "benchmark.accuracy_budget")})
    for name, epochs in (summary.get("history") or {}).items():
        losses = [(e.get("epoch", i + 1), e["train_loss"]) for i, e in enumerate(epochs) if "train_loss" in e]
        bad = next(((epoch, loss) for epoch, loss in losses if not _finite(loss)), None)
        if bad is not None:
            out.append({"kind": "diverged", "model": name, "message": (
                f"{name}'s training loss became {bad[1]} at epoch {bad[0]}: training diverged; lower the "
                "learning rate")})
        elif len(losses) > 1 and losses[-1][1] > max(1.5 * losses[0][1], losses[0][1] + DIVERGED_NATS):
            (first_epoch, first), (last_epoch, last) = losses[0], losses[-1]
            out.append({"kind": "diverged", "model": name, "message": (
                f"{name}'s training loss ended above where it began ({first:.4f} at epoch {first_epoch}, "
                f"{last:.4f} at epoch {last_epoch}): training diverged; lower the learning rate")})
    return out
