"""The run summary: joining every benchmark into one document, and the selection policy that
answers the run's question (which variant to deploy, on which runtime, at each batch size).

This module decides; ``pipeline.report`` and ``pipeline.plots`` only show what it decided. The
summary is plain JSON (``summary.json``): ``baseline`` (the fp32 row), ``variants`` (one row per
quantized variant, ``accuracy_top1`` None where it failed), ``selected`` and its reason,
``selection_per_batch``, ``data``, ``failures`` and the training ``history``.

Every row, the fp32 baseline's too, is served at each batch size by its fastest runtime within
the budget (``choose_runtimes``): ``runtime`` names it per batch, the latency fields hold its
figures and ``accuracy_top1_served`` its own top-1. ``accuracy_top1`` and ``accuracy_drop`` stay
the PyTorch (TorchScript) form's, the model's reference figures; ``accuracy_drop_served`` is the
served form's drop, which the selection reads. ``speedup_vs_fp32`` is the fastest fp32 form's p50
over the row's at the same batch size, ``speedup_vs_fp32_torchscript`` the fp32 TorchScript
file's over the row's.

In a sweep (plan entries with an ``arch``) there is one fp32 baseline per arch, under
``baselines``; ``baseline`` stays the first arch's. Each row is named like its plan node
(``variant@arch``), carries its ``variant``, ``arch`` and ``set``, and its ``accuracy_drop`` is
against its own arch's fp32, which is what the selection reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.trust import warnings as trust_warnings

if TYPE_CHECKING:
    from pipeline.stages.configs import ReportConfig

LATENCY_FIELDS = ("latency_ms_p50", "latency_ms_p95", "throughput_ips")
TOLERANCE = 1e-12  # a drop exactly on the budget is within it, whatever the float rounding


# ------------------------------------------------------------------------------ reading a summary

def selection_batch(summary: dict[str, Any]) -> str | None:
    """The batch size whose latency chose the variant (the first of ``benchmark.batch_sizes``)."""
    sizes = summary.get("batch_sizes") or []
    return str(sizes[0]) if sizes else None


def is_sweep(summary: dict[str, Any]) -> bool:
    return "baselines" in summary


def baseline_of(summary: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """The fp32 row that ``row`` is compared with: its arch's in a sweep, else the baseline."""
    if is_sweep(summary):
        return summary["baselines"].get(row.get("arch"))
    return summary.get("baseline")


def is_baseline(summary: dict[str, Any], row: dict[str, Any]) -> bool:
    return row.get("method") == "fp32" if is_sweep(summary) else row is summary.get("baseline")


def ordered(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The measured baselines and every variant row: the baseline first, or in a sweep each
    arch's baseline followed by that arch's variants."""
    variants = list(summary.get("variants", []))
    if not is_sweep(summary):
        base = summary.get("baseline")
        return ([base] if base else []) + variants
    rows = []
    for arch, base in summary["baselines"].items():
        rows += ([base] if base else []) + [v for v in variants if v.get("arch") == arch]
    return rows


def measured(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The baselines (if measured) and every variant that has results, in ``ordered`` order."""
    return [r for r in ordered(summary) if r.get("accuracy_top1") is not None]


def not_measured(summary: dict[str, Any]) -> list[str]:
    """Names of the baselines and variants without a result, as the report lists them."""
    missing = [f"fp32@{arch}" for arch, b in (summary.get("baselines") or {}).items() if not b]
    return missing + [str(v["name"]) for v in summary.get("variants", []) if v.get("accuracy_top1") is None]


def sensitivity_groups(summary: dict[str, Any]) -> list[tuple[list[str], dict[str, Any]]]:
    """Variants with a sensitivity analysis, those with the same analysis (the same calibration
    and conversion: the plan shares their parts) grouped: [(names, first such variant)]."""
    groups: list[tuple[list[str], dict[str, Any]]] = []
    for v in summary.get("variants", []):
        if not v.get("sensitivity"):
            continue
        same = next((g for g in groups if g[1]["sensitivity"] == v["sensitivity"]), None)
        if same:
            same[0].append(str(v["name"]))
            if v.get("fallback") and not same[1].get("fallback"):
                groups[groups.index(same)] = (same[0], v)  # show what the fallback kept
        else:
            groups.append(([str(v["name"])], v))
    return groups


def trained_on(summary: dict[str, Any]) -> str:
    """Where each trained model (fp32, QAT variants) trained, from its epochs' history: the
    device's name (a GPU's, or cpu), its type and the precision; empty when nothing trained."""
    parts = []
    for name, epochs in (summary.get("history") or {}).items():
        seen: list[str] = []
        for h in epochs:
            kind = ", ".join(str(v) for v in (h.get("device"), h.get("precision")) if v)
            where = f"{h.get('device_name') or h.get('device') or 'unknown'}" + (f" ({kind})" if kind else "")
            if where not in seen:
                seen.append(where)
        if seen:
            parts.append(f"{name}: {' then '.join(seen)}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ the policy

def entry(bench: dict[str, Any]) -> dict[str, Any]:
    """A summary row for one benchmarked model, from its benchmark manifest."""
    m = bench["metrics"]
    return {
        "name": bench["name"],
        "method": bench["method"],
        "accuracy_top1": m["accuracy_top1"],
        "latency_ms_p50": m["latency_ms_p50"],
        "latency_ms_p95": m["latency_ms_p95"],
        "throughput_ips": m["throughput_ips"],
        "size_bytes": m["size_bytes"],
        "int8_layers": bench.get("int8_layers"),
        "fp32_layers": bench.get("fp32_layers"),
        "artifact": bench["outputs"]["model"]["uri"],
        "sha256": bench["outputs"]["model"]["sha256"],
        "format": bench["format"],
        "manifest": bench.get("manifest_uri"),
        **{k: bench[k] for k in ("sensitivity", "fallback", "runtimes", "skipped_runtimes") if bench.get(k)},
        # another engine's model: which, what it was asked to do, and the runtime of its reference figures
        **{k: bench[k] for k in ("engine", "engine_settings", "quantizers", "reference_runtime") if bench.get(k)},
    }


def served_top1(row: dict[str, Any]) -> dict[str, float]:
    """{batch: top-1 of the form that serves ``row`` at that batch}; a row from before the
    runtimes were chosen (or measured in TorchScript only) has its one top-1 at every batch."""
    return row.get("accuracy_top1_served") or {b: row["accuracy_top1"] for b in row.get("latency_ms_p50", {})}


def choose_runtimes(row: dict[str, Any], baseline_accuracy: float | None, budget: float) -> None:
    """Serve ``row`` at each batch size with its fastest runtime whose own top-1 is within
    ``budget`` of the fp32 baseline, in place: ``runtime`` becomes {batch: runtime}, the
    latency fields hold that runtime's figures and ``accuracy_top1_served`` its top-1
    (``runtimes`` keeps every runtime's). A row with no form within the budget, measured in
    TorchScript only, or without a baseline, keeps TorchScript, or its ``reference_runtime``
    where it has no TorchScript form (another engine's model). The fp32 baseline is served the
    same way, against its own PyTorch top-1."""
    forms = row.get("runtimes") or {}
    usable = {rt: m for rt, m in forms.items()
              if baseline_accuracy is not None and baseline_accuracy - m["accuracy_top1"] <= budget + TOLERANCE}
    reference = row.get("reference_runtime", "torchscript")  # the form of the row's own figures
    row["runtime"], row["accuracy_top1_served"] = {}, {}
    for batch in list(row.get("latency_ms_p50", {})):
        best = min(usable, key=lambda rt: usable[rt]["latency_ms_p50"][batch], default=reference)
        row["runtime"][batch] = best
        row["accuracy_top1_served"][batch] = usable[best]["accuracy_top1"] if best in usable else row["accuracy_top1"]
        if best != reference:
            for f in LATENCY_FIELDS:
                row[f] = {**row[f], batch: usable[best][f][batch]}


def _ratios(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    return {b: round(num[b] / d, 3) for b, d in den.items() if b in num and d > 0}


def compare(row: dict[str, Any], base: dict[str, Any]) -> None:
    """Set ``row``'s figures against its fp32 baseline ``base`` (both served already), in place:
    ``accuracy_drop_served`` {batch: drop of the served form vs the baseline's PyTorch top-1}
    (not for the baseline itself), ``speedup_vs_fp32`` {batch: the fastest fp32 form's p50 /
    the row's} and ``speedup_vs_fp32_torchscript`` {batch: the fp32 TorchScript file's p50 /
    the row's}."""
    if row is not base:
        row["accuracy_drop_served"] = {b: base["accuracy_top1"] - top for b, top in served_top1(row).items()}
    fp32_torchscript = ((base.get("runtimes") or {}).get("torchscript") or {}).get("latency_ms_p50") \
        or base["latency_ms_p50"]  # a baseline measured in TorchScript only
    row["speedup_vs_fp32"] = _ratios(base["latency_ms_p50"], row["latency_ms_p50"])
    row["speedup_vs_fp32_torchscript"] = _ratios(fp32_torchscript, row["latency_ms_p50"])


def skipped_runtimes(summary: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """The runtimes some model was not measured on, each reason once: [(runtime, why, the
    names of the baselines and variants it was skipped for)], in ``ordered`` order."""
    found: dict[tuple[str, str], list[str]] = {}
    for row in ordered(summary):
        for rt, why in (row.get("skipped_runtimes") or {}).items():
            found.setdefault((rt, str(why)), []).append(str(row["name"]))
    return [(rt, why, names) for (rt, why), names in found.items()]


def _drop_at(v: dict[str, Any], batch: str) -> float | None:
    """The top-1 drop of the form serving ``v`` at ``batch`` (``accuracy_drop`` before runtimes
    were chosen)."""
    return (v.get("accuracy_drop_served") or {}).get(batch, v.get("accuracy_drop"))


def select(variants: list[dict], budget: float, batch: str) -> tuple[str | None, str]:
    """The fastest variant at ``batch`` whose top-1 drop vs its fp32 baseline, measured on the
    runtime that serves it there (``accuracy_drop_served``, set by ``build``; else
    ``accuracy_drop``), is within ``budget``."""
    measured = [v for v in variants if v.get("accuracy_top1") is not None]
    if measured and all(v.get("accuracy_drop") is None for v in measured):
        return None, "no fp32 baseline was measured"
    ok = [v for v in measured if _drop_at(v, batch) is not None and _drop_at(v, batch) <= budget + TOLERANCE]
    if not ok:
        return None, f"no variant is within the accuracy budget of {budget:.4f}"
    best = min(ok, key=lambda v: v["latency_ms_p50"][batch])
    runtime = (best.get("runtime") or {}).get(batch, "torchscript")
    return best["name"], (f"fastest at batch {batch} ({best['latency_ms_p50'][batch]:.2f} ms p50 on {runtime}, "
                          f"top-1 {served_top1(best)[batch]:.4f}) among {len(ok)} variant(s) within the accuracy "
                          f"budget of {budget:.4f}")


def per_batch(variants: list[dict], budget: float, batch_sizes: list) -> dict[str, dict[str, Any]]:
    """For each batch size, what to deploy: the selected variant, the runtime that serves it, its
    p50 and top-1 there and, where there is a baseline, its speedup over the fastest fp32 form
    (batch sizes where nothing is within the budget are left out)."""
    out = {}
    for b in (str(b) for b in batch_sizes):
        name, _ = select(variants, budget, b)
        if name is not None:
            row = next(v for v in variants if v["name"] == name)
            speedup = (row.get("speedup_vs_fp32") or {}).get(b)
            out[b] = {"variant": name, "runtime": (row.get("runtime") or {}).get(b, "torchscript"),
                      "latency_ms_p50": row["latency_ms_p50"][b], "accuracy_top1": served_top1(row)[b],
                      **({"speedup_vs_fp32": speedup} if speedup is not None else {})}
    return out


def _placed(row: dict, v: dict) -> dict:
    """``row`` as the plan's entry ``v`` places it: in a sweep, named ``variant@arch``, with its
    variant, arch and set; without a sweep, unchanged."""
    if "arch" not in v:
        return row
    return {"name": v["name"], "variant": v["name"].removesuffix(f"@{v['arch']}"), "arch": v["arch"],
            "set": v.get("set")} | {k: x for k, x in row.items() if k != "name"}


def build(cfg: ReportConfig, data: dict[str, Any] | None, benches: dict[str, dict[str, Any]],
          failures: list[dict[str, Any]], *, run_id: str, cancelled: bool = False) -> dict[str, Any]:
    """The summary of a run from the report stage's config (its name, accuracy budget, batch
    sizes and the plan's variants), the ingest manifest (None if it failed), the
    benchmark manifests that exist (by variant name) and the failures recorded so far (a
    variant whose benchmark never came is added to them). Status: CANCELLED if the run was
    cancelled, FAILED if any baseline or variant has no result, else SUCCESS."""
    failures = list(failures)
    budget = cfg.accuracy_budget
    sweep = any("arch" in v for v in cfg.variants)
    # arch -> its fp32 row (None if not measured); without a sweep, the one baseline under None
    baselines = {v.get("arch"): _placed(entry(benches[v["name"]]), v) if v["name"] in benches else None
                 for v in cfg.variants if v["method"] == "fp32"}
    for base in baselines.values():  # each fp32 on its fastest form, which the speedups are against
        if base:
            choose_runtimes(base, base["accuracy_top1"], budget)
            compare(base, base)
    baseline = next(iter(baselines.values()), None)  # the first arch's
    variants = []
    for v in (v for v in cfg.variants if v["method"] != "fp32"):
        base = baselines.get(v.get("arch"))
        if v["name"] in benches:
            row = _placed(entry(benches[v["name"]]), v)
            if base:
                row["accuracy_drop"] = base["accuracy_top1"] - row["accuracy_top1"]
            choose_runtimes(row, base["accuracy_top1"] if base else None, budget)
            if base:
                compare(row, base)
            variants.append(row)
        else:
            variants.append(_placed({"name": v["name"], "method": v["method"], "accuracy_top1": None,
                                     "status": "FAILED", **({"engine": v["engine"]} if "engine" in v else {})}, v))
            if not any(f.get("variant") == v["name"] for f in failures):
                failures.append({"stage": "benchmark", "variant": v["name"], "error": "no benchmark result"})
    selected, reason = select(variants, budget, str(cfg.batch_sizes[0]))
    if cancelled:
        status = "CANCELLED"
    elif failures or None in baselines.values() or any(v.get("accuracy_top1") is None for v in variants):
        status = "FAILED"
    else:
        status = "SUCCESS"
    summary = {
        "run_id": run_id,
        "name": cfg.name,
        "status": status,
        "baseline": baseline,
        **({"baselines": baselines} if sweep else {}),
        "variants": variants,
        "selected": selected,
        "selection_reason": reason,
        "selection_per_batch": per_batch(variants, budget, cfg.batch_sizes),
        "accuracy_budget": budget,
        "batch_sizes": list(cfg.batch_sizes),
        "data": {
            "classes": len(data["classes"]) if data else None,
            "class_names": data["classes"] if data else None,
            "train": data["sizes"]["train"] if data else None,
            "val": data["sizes"]["val"] if data else None,
            "skipped": data["skipped"] if data else [],
            "notes": data.get("notes", []) if data else [],
        },
        "failures": failures,
        "history": {name: b.get("history", []) for name, b in benches.items() if b.get("history")},
    }
    summary["warnings"] = trust_warnings(summary)  # what makes this answer untrustworthy (pipeline.trust)
    return summary
