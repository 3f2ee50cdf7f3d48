"""Per-layer sensitivity to int8 and the accuracy-budget fallback, on one calibration.

A layer's sensitivity is measured with *that layer alone in int8* and every other layer fp32:
the top-1 drop on the validation split and the SQNR of the logits against fp32. Alone, the
measurement isolates the layer's own error (its weights and the activations quantized around
it), so it ranks layers even where errors compound or cancel in the all-int8 model, and it does
not depend on which other layers happen to be quantized. The ranking sorts by that top-1 drop,
then by SQNR (lower: more sensitive), since most layers of a well-calibrated model drop no top-1
at all alone and only the SQNR tells them apart.

The complementary view, *all but that layer* in int8, is measured too (``all_but_top1``,
``all_but_sqnr_db``, and ``recovered_top1`` against the all-int8 model): what keeping that one
layer in fp32 buys back. It is the fallback's question for one layer, but a layer whose error
comes from an activation shared with its neighbour (an outlier channel between two convolutions)
buys back nothing alone, while the "alone" view flags both; so the fallback follows the "alone"
ranking and keeps layers in that order, measuring each mix.

Every conversion reuses the one calibrated graph (``pipeline.quant.convert_calibrated``), so a
layer's row depends only on the calibration and the layer: the rows of different parts computed
on different workers fit together into one ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.quant import convert_calibrated, quantizable_layers, quiet

EVAL_BATCH = 64


@torch.no_grad()
def logits_of(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """The model's outputs on normalized images ``x``, in batches."""
    if isinstance(model, nn.Module):
        model.eval()
    with quiet():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).float()


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference``, in dB (inf when equal)."""
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def json_db(v: float) -> float | None:
    """JSON-safe: inf (an exact match) becomes None."""
    return None if math.isinf(v) or math.isnan(v) else round(v, 4)


def part_layers(observed: nn.Module, part: int, parts: int) -> list[str]:
    """The layers of part ``part`` of ``parts``: every layer dealt round-robin in graph order,
    so each part gets early (large, slow) and late layers alike."""
    return quantizable_layers(observed)[part::parts]


def measure(observed: nn.Module, layers: Sequence[str], x: torch.Tensor, y: torch.Tensor, fp32: torch.Tensor,
            *, on_layer: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
    """One row per layer: top-1 drop and logit SQNR with that layer alone in int8, and top-1 and
    logit SQNR with all but that layer in int8. ``fp32`` holds the fp32 model's logits on ``x``."""
    everything = quantizable_layers(observed)
    fp32_top1 = top1(fp32, y)
    rows = []
    for i, layer in enumerate(layers):
        if on_layer:
            on_layer(i, layer)
        alone = logits_of(convert_calibrated(observed, [n for n in everything if n != layer]), x)
        but = logits_of(convert_calibrated(observed, [layer]), x)
        rows.append({"layer": layer, "index": everything.index(layer),
                     "drop_top1": round(fp32_top1 - top1(alone, y), 6), "sqnr_db": json_db(sqnr_db(fp32, alone)),
                     "all_but_top1": top1(but, y), "all_but_sqnr_db": json_db(sqnr_db(fp32, but))})
    return rows


def rank(rows: list[dict[str, Any]], int8_accuracy: float) -> list[dict[str, Any]]:
    """Rows ranked most sensitive first: by the top-1 drop with the layer alone in int8, then by
    its SQNR (lower first), then graph order. Adds ``recovered_top1`` (what keeping the layer fp32
    buys back from the all-int8 model) and a 1-based ``rank``."""
    out = [{**r, "recovered_top1": round(r["all_but_top1"] - int8_accuracy, 6)} for r in rows]
    out.sort(key=lambda r: (-r["drop_top1"], math.inf if r["sqnr_db"] is None else r["sqnr_db"], r["index"]))
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


def search_fallback(ranking: list[dict[str, Any]], accuracy_of: Callable[[list[str]], float], *,
                    fp32_accuracy: float, budget: float,
                    on_try: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Keep the most sensitive layers in fp32, fewest first: the first k = 0, 1, 2, ... for which
    the top-1 drop against fp32 (``accuracy_of(kept layers)``) is within ``budget``. When no k
    meets it, the result says so and holds the best mix tried (the highest top-1; the fewest
    layers among equals). Every try is listed in ``tried``."""
    names = [r["layer"] for r in ranking]
    tried: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for k in range(len(names) + 1):
        if on_try:
            on_try(k, len(names))
        acc = accuracy_of(names[:k])
        drop = fp32_accuracy - acc
        tried.append({"kept": k, "accuracy_top1": acc, "drop": round(drop, 6)})
        if best is None or acc > best["accuracy_top1"]:
            best = {"kept": k, "accuracy_top1": acc, "drop": drop}
        if drop <= budget + 1e-12:
            best = {"kept": k, "accuracy_top1": acc, "drop": drop}
            break
    assert best is not None
    met = best["drop"] <= budget + 1e-12
    kept = names[:best["kept"]]
    if met:
        message = (f"within the budget of {budget:.4f} with {len(kept)} layer(s) kept in fp32"
                   if kept else f"all layers int8 are already within the budget of {budget:.4f}")
    else:
        message = (f"no mix meets the budget of {budget:.4f}: even the best one tried, {len(kept)} layer(s) kept in "
                   f"fp32, drops {best['drop']:.4f}; use QAT, another observer, or a larger budget")
    return {"mode": "auto", "budget": budget, "met": met, "kept_fp32": kept, "fp32_accuracy": fp32_accuracy,
            "accuracy_top1": best["accuracy_top1"], "drop": round(best["drop"], 6), "tried": tried,
            "message": message}
