"""report (cpu): join every benchmark, select the fastest variant within the accuracy budget,
write ``report.md`` and ``summary.json`` under ``runs/{run_id}/``. Runs even when some variants
failed: the summary lists what succeeded and names each failure."""

from __future__ import annotations

from pipeline.report import entry, markdown, select
from pipeline.stages import StageContext, manifest_key, register


@register("report", version=1, queue="cpu", cached=False, partial_inputs=True)
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
    md = ctx.put_json("summary.json", summary)
    report_ref = ctx.store.put_bytes(f"{ctx.prefix}/report.md", markdown(summary, layers).encode()).to_dict()
    return {"summary": summary, "outputs": {"summary": md, "report": report_ref}}
