"""Joining benchmark results into a run summary, choosing a variant, and writing the report."""

from __future__ import annotations

from typing import Any


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
    }


def select(baseline: dict | None, variants: list[dict], budget: float, batch: str) -> tuple[str | None, str]:
    """The fastest variant at ``batch`` whose top-1 drop vs fp32 is within ``budget``."""
    if baseline is None:
        return None, "no fp32 baseline was measured"
    ok = [v for v in variants if v.get("accuracy_top1") is not None
          and baseline["accuracy_top1"] - v["accuracy_top1"] <= budget + 1e-12]
    if not ok:
        return None, f"no variant is within the accuracy budget of {budget:.4f}"
    best = min(ok, key=lambda v: v["latency_ms_p50"][batch])
    return best["name"], (f"fastest at batch {batch} ({best['latency_ms_p50'][batch]:.2f} ms p50) among "
                          f"{len(ok)} variant(s) within the accuracy budget of {budget:.4f}")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def table(summary: dict[str, Any]) -> list[list[str]]:
    """Rows (with a header) of the variant table that the CLI prints and the report shows."""
    batches = [str(b) for b in summary.get("batch_sizes", [])]
    header = ["variant", "method", "top-1", "drop vs fp32"] + [f"p50 ms @{b}" for b in batches] + \
             ["size", "int8/fp32 layers", "selected"]
    rows = [header]
    base = summary.get("baseline")
    for v in ([base] if base else []) + summary.get("variants", []):
        if v.get("accuracy_top1") is None:
            rows.append([v["name"], v.get("method", "?"), "FAILED", "-"] + ["-"] * len(batches) +
                        ["-", "-", ""])
            continue
        drop = "" if v is base else f"{base['accuracy_top1'] - v['accuracy_top1']:+.4f}" if base else "-"
        layers = "-" if v.get("int8_layers") is None else f"{v['int8_layers']}/{v['fp32_layers']}"
        rows.append([v["name"], v["method"], f"{v['accuracy_top1']:.4f}", drop or "(baseline)"] +
                    [f"{v['latency_ms_p50'][b]:.2f}" for b in batches] +
                    [_mb(v["size_bytes"]), layers, "*" if summary.get("selected") == v["name"] else ""])
    return rows


def text_table(summary: dict[str, Any]) -> str:
    rows = table(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(summary: dict[str, Any], layers: dict[str, list[dict]]) -> str:
    rows = table(summary)
    out = [f"# qpipe report: {summary['name']}", "",
           f"Run `{summary['run_id']}`: **{summary['status']}**.", ""]
    data = summary.get("data", {})
    out += [f"Data: {data.get('classes')} classes, {data.get('train')} training and {data.get('val')} "
            f"validation images, {len(data.get('skipped', []))} file(s) skipped.", ""]
    out += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    out += ["", f"Selected: **{summary.get('selected') or 'none'}**: {summary.get('selection_reason', '')}", ""]
    if summary.get("failures"):
        out += ["## Failures", ""] + [f"- `{f['stage']}` ({f.get('variant') or '-'}): {f['error']}"
                                      for f in summary["failures"]] + [""]
    if data.get("skipped"):
        out += ["## Skipped files", ""] + [f"- `{s['file']}`: {s['reason']}" for s in data["skipped"][:200]] + [""]
    for name, rows_ in layers.items():
        if not rows_:
            continue
        int8 = sum(1 for r in rows_ if r["precision"].startswith("int8"))
        out += [f"## Layers of {name}: {int8} int8, {len(rows_) - int8} fp32", "",
                "| layer | type | precision |", "|---|---|---|"]
        out += [f"| {r['layer']} | {r['type']} | {r['precision']} |" for r in rows_] + [""]
    out += ["## Artifacts", ""]
    for v in ([summary["baseline"]] if summary.get("baseline") else []) + summary.get("variants", []):
        if v.get("artifact"):
            out.append(f"- {v['name']}: `{v['artifact']}` (manifest `{v['manifest']}`)")
    return "\n".join(out) + "\n"
