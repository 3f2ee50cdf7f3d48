"""report (cpu): join every benchmark into the run summary and select the fastest variant within
the accuracy budget (``pipeline.summary``), draw the pictures (``pipeline.plots``), and write
``summary.json``, ``report.md``, ``report.html`` (``pipeline.report``) and the PNGs side by side
under ``runs/{run_id}/``. Runs even when some variants failed: the summary lists what succeeded
and names each failure, and the pictures show what was measured."""

from __future__ import annotations

import logging
import time

from pipeline.plots import FILES, render_all
from pipeline.report import html_page, markdown
from pipeline.stages import StageContext, manifest_key
from pipeline.stages.configs import ReportConfig
from pipeline.summary import build

log = logging.getLogger(__name__)


def report(ctx: StageContext, cfg: ReportConfig, inputs: dict) -> dict:
    benches = {}
    for v in cfg.variants:
        b = inputs.get(f"bench_{v['name']}")
        if b is not None:
            b["manifest_uri"] = ctx.store.url(manifest_key("benchmark", b["key"]))
            benches[v["name"]] = b
    summary = build(cfg, inputs.get("data"), benches, ctx.extra.get("failures", []), run_id=ctx.run_id,
                    cancelled=bool(ctx.extra.get("cancelled")))
    summary["report"] = ctx.store.url(f"{ctx.prefix}/report.md")
    summary["cached_stages"] = int(ctx.extra.get("cached_stages", 0))
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
