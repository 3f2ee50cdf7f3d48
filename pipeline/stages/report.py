"""report (cpu): join every benchmark, select the fastest variant within the accuracy budget,
draw the pictures, and write ``summary.json``, ``report.md``, ``report.html`` and the PNGs side
by side under ``runs/{run_id}/``. Runs even when some variants failed: the summary lists what
succeeded and names each failure, and the pictures show what was measured.

In a sweep (plan entries with an ``arch``) there is one fp32 baseline per arch, under
``baselines``; ``baseline`` stays the first arch's. Each row is named like its plan node
(``variant@arch``), carries its ``variant``, ``arch`` and ``set``, and its ``accuracy_drop`` is
against its own arch's fp32, which is what the selection reads."""

from __future__ import annotations

import logging
import time

from pipeline.plots import FILES, render_all
from pipeline.report import choose_runtimes, entry, html_page, markdown, per_batch, select
from pipeline.stages import StageContext, manifest_key

log = logging.getLogger(__name__)


def _placed(row: dict, v: dict) -> dict:
    """``row`` as the plan's entry ``v`` places it: in a sweep, named ``variant@arch``, with its
    variant, arch and set; without a sweep, unchanged."""
    if "arch" not in v:
        return row
    return {"name": v["name"], "variant": v["name"].removesuffix(f"@{v['arch']}"), "arch": v["arch"],
            "set": v.get("set")} | {k: x for k, x in row.items() if k != "name"}


def report(ctx: StageContext, cfg: dict, inputs: dict) -> dict:
    data = inputs.get("data")
    failures = list(ctx.extra.get("failures", []))
    benches = {}
    for v in cfg["variants"]:
        b = inputs.get(f"bench_{v['name']}")
        if b is not None:
            b["manifest_uri"] = ctx.store.url(manifest_key("benchmark", b["key"]))
            benches[v["name"]] = b
    sweep = any("arch" in v for v in cfg["variants"])
    # arch -> its fp32 row (None if not measured); without a sweep, the one baseline under None
    baselines = {v.get("arch"): _placed(entry(benches[v["name"]]), v) if v["name"] in benches else None
                 for v in cfg["variants"] if v["method"] == "fp32"}
    baseline = next(iter(baselines.values()), None)  # the first arch's
    variants = []
    for v in (v for v in cfg["variants"] if v["method"] != "fp32"):
        base = baselines.get(v.get("arch"))
        if v["name"] in benches:
            row = _placed(entry(benches[v["name"]]), v)
            if base:
                row["accuracy_drop"] = base["accuracy_top1"] - row["accuracy_top1"]
            choose_runtimes(row, base["accuracy_top1"] if base else None, cfg["accuracy_budget"])
            variants.append(row)
        else:
            variants.append(_placed({"name": v["name"], "method": v["method"], "accuracy_top1": None,
                                     "status": "FAILED"}, v))
            if not any(f.get("variant") == v["name"] for f in failures):
                failures.append({"stage": "benchmark", "variant": v["name"], "error": "no benchmark result"})
    batch = str(cfg["batch_sizes"][0])
    selected, reason = select(variants, cfg["accuracy_budget"], batch)
    if ctx.extra.get("cancelled"):
        status = "CANCELLED"
    elif failures or None in baselines.values() or any(v.get("accuracy_top1") is None for v in variants):
        status = "FAILED"
    else:
        status = "SUCCESS"
    summary = {
        "run_id": ctx.run_id,
        "name": cfg["name"],
        "status": status,
        "baseline": baseline,
        **({"baselines": baselines} if sweep else {}),
        "variants": variants,
        "selected": selected,
        "selection_reason": reason,
        "selection_per_batch": per_batch(variants, cfg["accuracy_budget"], cfg["batch_sizes"]),
        "accuracy_budget": cfg["accuracy_budget"],
        "batch_sizes": cfg["batch_sizes"],
        "report": ctx.store.url(f"{ctx.prefix}/report.md"),
        "data": {
            "classes": len(data["classes"]) if data else None,
            "class_names": data["classes"] if data else None,
            "train": data["sizes"]["train"] if data else None,
            "val": data["sizes"]["val"] if data else None,
            "skipped": data["skipped"] if data else [],
            "notes": data.get("notes", []) if data else [],
        },
        "failures": failures,
        "cached_stages": int(ctx.extra.get("cached_stages", 0)),
        "history": {name: b.get("history", []) for name, b in benches.items() if b.get("history")},
    }
    layers = {name: b.get("layers", []) for name, b in benches.items()}
    t0 = time.perf_counter()
    drawn, plot_errors = render_all(summary, ctx.workdir / "plots")
    log.info("%s: %d plot(s) drawn in %.2fs", ctx.run_id, len(drawn), time.perf_counter() - t0)
    plot_refs = {kind: ctx.put(FILES[kind], path) for kind, path in drawn.items()}
    summary["plots"] = {kind: ref["uri"] for kind, ref in plot_refs.items()}
    if plot_errors:
        summary["plot_errors"] = plot_errors
    summary["report_html"] = ctx.store.url(f"{ctx.prefix}/report.html")
    md = ctx.put_json("summary.json", summary)
    report_ref = ctx.store.put_bytes(f"{ctx.prefix}/report.md", markdown(summary, layers).encode()).to_dict()
    html_ref = ctx.store.put_bytes(f"{ctx.prefix}/report.html", html_page(summary, layers).encode()).to_dict()
    return {"summary": summary,
            "outputs": {"summary": md, "report": report_ref, "report_html": html_ref, "plots": plot_refs}}
