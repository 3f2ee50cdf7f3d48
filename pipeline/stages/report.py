"""report (cpu): join every benchmark, select the fastest variant within the accuracy budget,
draw the pictures, and write ``summary.json``, ``report.md``, ``report.html`` and the PNGs side
by side under ``runs/{run_id}/``. Runs even when some variants failed: the summary lists what
succeeded and names each failure, and the pictures show what was measured."""

from __future__ import annotations

import logging
import time

from pipeline.plots import FILES, render_all
from pipeline.report import entry, html_page, markdown, select
from pipeline.stages import StageContext, manifest_key, register

log = logging.getLogger(__name__)


@register("report", version=2, queue="cpu", cached=False, partial_inputs=True)
def report(ctx: StageContext, cfg: dict, inputs: dict) -> dict:
    data = inputs.get("data")
    failures = list(ctx.extra.get("failures", []))
    benches = {}
    for v in cfg["variants"]:
        b = inputs.get(f"bench_{v['name']}")
        if b is not None:
            b["manifest_uri"] = ctx.store.url(manifest_key("benchmark", b["key"]))
            benches[v["name"]] = b
    baseline = entry(benches["fp32"]) if "fp32" in benches else None
    variants = []
    for v in cfg["variants"][1:]:
        if v["name"] in benches:
            row = entry(benches[v["name"]])
            if baseline:
                row["accuracy_drop"] = baseline["accuracy_top1"] - row["accuracy_top1"]
            variants.append(row)
        else:
            variants.append({"name": v["name"], "method": v["method"], "accuracy_top1": None, "status": "FAILED"})
            if not any(f.get("variant") == v["name"] for f in failures):
                failures.append({"stage": "benchmark", "variant": v["name"], "error": "no benchmark result"})
    batch = str(cfg["batch_sizes"][0])
    selected, reason = select(baseline, [v for v in variants if v.get("accuracy_top1") is not None],
                              cfg["accuracy_budget"], batch)
    if ctx.extra.get("cancelled"):
        status = "CANCELLED"
    elif failures or baseline is None or any(v.get("accuracy_top1") is None for v in variants):
        status = "FAILED"
    else:
        status = "SUCCESS"
    summary = {
        "run_id": ctx.run_id,
        "name": cfg["name"],
        "status": status,
        "baseline": baseline,
        "variants": variants,
        "selected": selected,
        "selection_reason": reason,
        "accuracy_budget": cfg["accuracy_budget"],
        "batch_sizes": cfg["batch_sizes"],
        "report": ctx.store.url(f"{ctx.prefix}/report.md"),
        "data": {
            "classes": len(data["classes"]) if data else None,
            "class_names": data["classes"] if data else None,
            "train": data["sizes"]["train"] if data else None,
            "val": data["sizes"]["val"] if data else None,
            "skipped": data["skipped"] if data else [],
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
