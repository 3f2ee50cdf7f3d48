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

With ``fallback: latency`` each part also times what keeping a layer fp32 costs: the all-but-that-
layer model against the all-int8 model, at batch 1 on one thread, interleaved round by round in
the same process (``cost_ms``, the median of the per-round differences). ``rank_by_latency`` then
orders the layers by top-1 bought back per millisecond: the benefit of a layer is the larger of
its two views (``drop_top1`` alone, ``recovered_top1`` all-but), divided by its cost (at least
``MIN_COST_MS``, so a free layer ranks by its benefit and noise below it cannot invert the
order); layers that buy back nothing follow in the sensitivity order. The fallback then keeps
layers in that order, so where two layers recover the same top-1 the cheap one is kept first.

Every conversion reuses the one calibrated graph (``pipeline.quant.convert_calibrated``), so a
layer's row depends only on the calibration and the layer: the rows of different parts computed
on different workers fit together into one ranking.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.quant import convert_calibrated, quantizable_layers, quiet

EVAL_BATCH = 64
MIN_COST_MS = 0.01  # costs below this (timer noise, or a layer that is no slower in fp32) count as this
COST_ROUNDS = 15  # interleaved rounds per layer when timing what keeping it fp32 costs
COST_CALLS = 3  # calls per model per round


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


@torch.no_grad()
def extra_ms(model: nn.Module, reference: nn.Module, x1: torch.Tensor, rounds: int = COST_ROUNDS,
             calls: int = COST_CALLS) -> float:
    """How many milliseconds one call of ``model`` takes beyond one of ``reference`` on ``x1``:
    the median over interleaved rounds of the difference of their per-call means, so drift in
    the machine's speed hits both alike. One thread, as the benchmark times batch 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        reference.eval()
        with quiet():
            for _ in range(2):  # warm-up: first calls allocate and pick kernels
                model(x1), reference(x1)
            diffs = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    model(x1)
                t1 = time.perf_counter()
                for _ in range(calls):
                    reference(x1)
                t2 = time.perf_counter()
                diffs.append(((t1 - t0) - (t2 - t1)) / calls * 1000.0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(diffs)


def measure(observed: nn.Module, layers: Sequence[str], x: torch.Tensor, y: torch.Tensor, fp32: torch.Tensor,
            *, on_layer: Callable[[int, str], None] | None = None, timed: bool = False) -> list[dict[str, Any]]:
    """One row per layer: top-1 drop and logit SQNR with that layer alone in int8, and top-1 and
    logit SQNR with all but that layer in int8. ``fp32`` holds the fp32 model's logits on ``x``.
    ``timed``: also ``cost_ms``, what the all-but model takes beyond the all-int8 one at batch 1."""
    everything = quantizable_layers(observed)
    fp32_top1 = top1(fp32, y)
    all_int8 = convert_calibrated(observed) if timed else None
    rows = []
    for i, layer in enumerate(layers):
        if on_layer:
            on_layer(i, layer)
        alone = logits_of(convert_calibrated(observed, [n for n in everything if n != layer]), x)
        but_model = convert_calibrated(observed, [layer])
        but = logits_of(but_model, x)
        row = {"layer": layer, "index": everything.index(layer),
               "drop_top1": round(fp32_top1 - top1(alone, y), 6), "sqnr_db": json_db(sqnr_db(fp32, alone)),
               "all_but_top1": top1(but, y), "all_but_sqnr_db": json_db(sqnr_db(fp32, but))}
        if all_int8 is not None:
            row["cost_ms"] = round(extra_ms(but_model, all_int8, x[:1]), 5)
        rows.append(row)
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


def rank_by_latency(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``rank`` (each with ``cost_ms``) ordered by top-1 bought back per millisecond
    of keeping the layer fp32, highest first; layers that buy back nothing keep their sensitivity
    order after them. Adds ``benefit_top1``, ``recovered_per_ms`` and a 1-based ``latency_rank``."""
    out = []
    for r in ranked:
        benefit = max(r["drop_top1"], r["recovered_top1"], 0.0)
        out.append({**r, "benefit_top1": round(benefit, 6),
                    "recovered_per_ms": round(benefit / max(r["cost_ms"], MIN_COST_MS), 6)})
    out.sort(key=lambda r: (r["benefit_top1"] <= 0.0, -r["recovered_per_ms"], r["rank"]))
    for i, r in enumerate(out, 1):
        r["latency_rank"] = i
    return out


def search_fallback(ranking: list[dict[str, Any]], accuracy_of: Callable[[list[str]], float], *,
                    fp32_accuracy: float, budget: float, order: str = "sensitivity",
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
    return {"mode": "auto" if order == "sensitivity" else "latency", "order": order, "budget": budget, "met": met,
            "kept_fp32": kept, "fp32_accuracy": fp32_accuracy,
            "accuracy_top1": best["accuracy_top1"], "drop": round(best["drop"], 6), "tried": tried,
            "message": message}
