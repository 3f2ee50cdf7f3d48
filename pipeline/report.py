"""Joining benchmark results into a run summary, choosing a variant, and writing the report:
``report.md`` and a self-contained ``report.html`` (inline CSS, no scripts, no external fonts),
both showing the pictures of ``pipeline.plots`` as PNG files next to them by relative path, so
the report's folder can be copied anywhere and still shows them."""

from __future__ import annotations

import html
from typing import Any

from pipeline.plots import (
    FILES,
    TITLES,
    baseline_of,
    is_baseline,
    is_sweep,
    ordered,
    selection_batch,
    sensitivity_groups,
)


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
    }


LATENCY_FIELDS = ("latency_ms_p50", "latency_ms_p95", "throughput_ips")


def choose_runtimes(row: dict[str, Any], baseline_accuracy: float | None, budget: float) -> None:
    """Serve ``row`` at each batch size with its fastest runtime whose own top-1 is within
    ``budget`` of the fp32 baseline, in place: ``runtime`` becomes {batch: runtime} and the
    latency fields hold that runtime's figures (``runtimes`` keeps every runtime's). A row
    measured in TorchScript only, or without a baseline, keeps TorchScript."""
    forms = row.get("runtimes") or {}
    usable = {rt: m for rt, m in forms.items() if rt == "torchscript" or (
        baseline_accuracy is not None and baseline_accuracy - m["accuracy_top1"] <= budget + 1e-12)}
    row["runtime"] = {}
    for batch in list(row.get("latency_ms_p50", {})):
        best = min(usable, key=lambda rt: usable[rt]["latency_ms_p50"][batch], default="torchscript")
        row["runtime"][batch] = best
        if best != "torchscript":
            for f in LATENCY_FIELDS:
                row[f] = {**row[f], batch: usable[best][f][batch]}


def select(variants: list[dict], budget: float, batch: str) -> tuple[str | None, str]:
    """The fastest variant at ``batch`` whose top-1 drop vs its fp32 baseline (each row's
    ``accuracy_drop``, set by the report stage) is within ``budget``."""
    measured = [v for v in variants if v.get("accuracy_top1") is not None]
    if measured and all(v.get("accuracy_drop") is None for v in measured):
        return None, "no fp32 baseline was measured"
    ok = [v for v in measured if v.get("accuracy_drop") is not None and v["accuracy_drop"] <= budget + 1e-12]
    if not ok:
        return None, f"no variant is within the accuracy budget of {budget:.4f}"
    best = min(ok, key=lambda v: v["latency_ms_p50"][batch])
    runtime = (best.get("runtime") or {}).get(batch, "torchscript")
    return best["name"], (f"fastest at batch {batch} ({best['latency_ms_p50'][batch]:.2f} ms p50 on {runtime}) "
                          f"among {len(ok)} variant(s) within the accuracy budget of {budget:.4f}")


def per_batch(variants: list[dict], budget: float, batch_sizes: list) -> dict[str, dict[str, Any]]:
    """For each batch size, what to deploy: the selected variant, the runtime that serves it and
    its p50 (batch sizes where nothing is within the budget are left out)."""
    out = {}
    for b in (str(b) for b in batch_sizes):
        name, _ = select(variants, budget, b)
        if name is not None:
            row = next(v for v in variants if v["name"] == name)
            out[b] = {"variant": name, "runtime": (row.get("runtime") or {}).get(b, "torchscript"),
                      "latency_ms_p50": row["latency_ms_p50"][b]}
    return out


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _latency_cell(row: dict[str, Any], batch: str) -> str:
    runtime = (row.get("runtime") or {}).get(batch, "torchscript")
    return f"{row['latency_ms_p50'][batch]:.2f}" + ("" if runtime == "torchscript" else f" ({runtime})")


def table(summary: dict[str, Any]) -> list[list[str]]:
    """Rows (with a header) of the variant table that the CLI prints and the report shows. A
    sweep's table has arch and set columns, lists each arch's fp32 (FAILED if it was not
    measured) before that arch's variants, and gives each drop against the row's own arch's fp32."""
    batches = [str(b) for b in summary.get("batch_sizes", [])]
    sweep = is_sweep(summary)
    header = ["variant"] + (["arch", "set"] if sweep else []) + ["method", "top-1", "drop vs fp32"] + \
             [f"p50 ms @{b}" for b in batches] + ["size", "int8/fp32 layers", "selected"]
    rows = [header]
    listed = ordered(summary)
    if sweep:
        listed = [r for arch, b in summary["baselines"].items() for r in
                  ([b] if b else [{"name": f"fp32@{arch}", "variant": "fp32", "arch": arch, "method": "fp32"}]) +
                  [v for v in summary.get("variants", []) if v.get("arch") == arch]]
    for v in listed:
        where = [v.get("variant", v["name"]), v.get("arch") or "-", v.get("set") or "-"] if sweep else [v["name"]]
        if v.get("accuracy_top1") is None:
            rows.append(where + [v.get("method", "?"), "FAILED", "-"] + ["-"] * len(batches) +
                        ["-", "-", ""])
            continue
        base = baseline_of(summary, v)
        drop = "" if is_baseline(summary, v) else f"{base['accuracy_top1'] - v['accuracy_top1']:+.4f}" if base else "-"
        layers = "-" if v.get("int8_layers") is None else f"{v['int8_layers']}/{v['fp32_layers']}"
        rows.append(where + [v["method"], f"{v['accuracy_top1']:.4f}", drop or "(baseline)"] +
                    [_latency_cell(v, b) for b in batches] +
                    [_mb(v["size_bytes"]), layers, "*" if summary.get("selected") == v["name"] else ""])
    return rows


def text_table(summary: dict[str, Any]) -> str:
    rows = table(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


CAPTIONS = {
    "accuracy_latency": "Top-1 against p50 latency at batch {batch} for every measured model. The green step line "
                        "is the Pareto front (no other model is both faster and more accurate), the dotted line "
                        "is the accuracy budget below the fp32 baseline, and the ringed point is the selected "
                        "variant: the fastest one above that line.",
    "accuracy_latency_sweep": "Top-1 against p50 latency at batch {batch} for every model of the sweep, one colour "
                              "and marker per arch, each arch's fp32 a square. The green step line is the Pareto "
                              "front over all of them. Each arch has its own accuracy budget, {budget:g} below its "
                              "own fp32, so no single budget line is drawn: a filled point is within the budget of "
                              "its arch's fp32, a hollow one is not. The ringed point is the selected variant: the "
                              "fastest filled one.",
    "size": "Size of each deployable artifact (the TorchScript file that users load).",
    "sensitivity": "Each layer measured alone in int8 (every other layer fp32) on the validation split: the top-1 "
                   "it loses and the SQNR of the logits against fp32. The most sensitive layers come first; red "
                   "bars are the layers the accuracy-budget fallback kept in fp32.",
    "training": "Loss and accuracy per epoch on the training split (solid) and the validation split (dashed), "
                "for the fp32 fine-tuning and each QAT variant.",
}


def layer_matrix(layers: dict[str, list[dict]]) -> tuple[list[str], list[tuple[str, list[str], list[str | None]]]]:
    """The per-layer table of every variant side by side: (variant names, rows), where a row is
    (layer, its distinct module types, its precision in each variant or None where absent)."""
    names = [n for n, rows in layers.items() if rows]
    order: dict[str, tuple[list[str], dict[str, str]]] = {}
    for n in names:
        for r in layers[n]:
            types, cells = order.setdefault(str(r["layer"]), ([], {}))
            if str(r["type"]) not in types:
                types.append(str(r["type"]))
            cells[n] = str(r["precision"])
    return names, [(layer, types, [cells.get(n) for n in names]) for layer, (types, cells) in order.items()]


def _counts(rows: list[dict]) -> tuple[int, int]:
    int8 = sum(1 for r in rows if str(r["precision"]).startswith("int8"))
    return int8, len(rows) - int8


def _not_plotted(summary: dict[str, Any]) -> list[str]:
    missing = [f"fp32@{arch}" for arch, b in (summary.get("baselines") or {}).items() if not b]
    return missing + [str(v["name"]) for v in summary.get("variants", []) if v.get("accuracy_top1") is None]


def _caption(kind: str, summary: dict[str, Any]) -> str:
    if kind == "accuracy_latency" and is_sweep(summary):
        kind = "accuracy_latency_sweep"
    text = CAPTIONS[kind].format(batch=selection_batch(summary), budget=summary.get("accuracy_budget") or 0.0)
    missing = _not_plotted(summary)
    if missing and kind != "training":
        text += f" Not shown (no result): {', '.join(missing)}."
    return text


SENSITIVITY_ROWS = 10  # layers listed per variant in the report's sensitivity table


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


def _ms(value: float) -> str:
    return f"{value:+.2f} ms"


def sections(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's sections about layers, as (title, paragraphs, table rows with a header):
    what the accuracy-budget fallback did for each variant that asked for it, and each sensitivity
    analysis's most sensitive layers. Plain text: the Markdown and HTML writers escape it."""
    out = []
    fallbacks = [v for v in summary.get("variants", []) if v.get("fallback")]
    if fallbacks:
        text = []
        rows = [["variant", "budget met", "kept fp32", "top-1 drop", "layers tried"] +
                [f"latency cost @{b}" for b in summary.get("batch_sizes", [])]]
        for v in fallbacks:
            fb = v["fallback"]
            text.append(f"{v['name']}: {fb['message']}." + (f" Kept in fp32: {', '.join(fb['kept_fp32'])}."
                                                             if fb["kept_fp32"] else ""))
            cost = fb.get("latency_cost_ms") or {}
            rows.append([v["name"], "yes" if fb["met"] else "NO", str(len(fb["kept_fp32"])), f"{fb['drop']:+.4f}",
                         str(len(fb["tried"]))] +
                        [_ms(cost[str(b)]) if str(b) in cost else "-" for b in summary.get("batch_sizes", [])])
        text.append("Latency cost: the variant's p50 minus that of the same model with every layer int8, both "
                    "timed by the benchmark stage in the same task.")
        out.append(("Accuracy-budget fallback", text, rows))
    measured = [v for v in summary.get("variants", []) if v.get("runtimes") and len(v["runtimes"]) > 1
                or v.get("skipped_runtimes")]
    if measured:
        batches = [str(b) for b in summary.get("batch_sizes", [])]
        rows = [["variant", "runtime", "top-1"] + [f"p50 ms @{b}" for b in batches] + ["size", "serves"]]
        text = ["Each static variant runs as its TorchScript file in PyTorch and as its ONNX QDQ export (the same "
                "int8 model) on ONNX Runtime and OpenVINO. At each batch size the variant is served by its fastest "
                "runtime whose own top-1 is within the budget; dynamic and QAT variants run in PyTorch only."]
        for v in measured:
            for rt, m in v.get("runtimes", {}).items():
                serves = [b for b in batches if (v.get("runtime") or {}).get(b) == rt]
                rows.append([v["name"], rt, f"{m['accuracy_top1']:.4f}"] +
                            [f"{m['latency_ms_p50'][b]:.2f}" for b in batches] +
                            [_mb(m.get("size_bytes")), ", ".join(f"@{b}" for b in serves) or "-"])
            for rt, why in (v.get("skipped_runtimes") or {}).items():
                text.append(f"{v['name']} on {rt}: skipped: {why}")
        out.append(("Runtimes", text, rows))
    for names, v in sensitivity_groups(summary):
        sens = v["sensitivity"]
        rows = [["rank", "layer", "top-1 drop alone", "SQNR alone (dB)", "top-1 recovered if kept fp32"]]
        rows += [[str(r["rank"]), r["layer"], f"{r['drop_top1']:+.4f}",
                  "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}", f"{r['recovered_top1']:+.4f}"]
                 for r in sens["ranking"][:SENSITIVITY_ROWS]]
        text = [f"{len(sens['ranking'])} layers measured in {sens['parts']} parts on {sens['val_images']} validation "
                f"images: fp32 top-1 {sens['fp32_accuracy']:.4f}, all int8 {sens['int8_accuracy']:.4f}. "
                f"The {min(SENSITIVITY_ROWS, len(sens['ranking']))} most sensitive are listed; the variant's "
                "benchmark manifest holds every layer."]
        out.append((f"Layer sensitivity: {', '.join(names)}", text, rows))
    return out


# ------------------------------------------------------------------------------------ Markdown

def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split("\n")).replace("|", "\\|")


def _code(text: Any) -> str:
    """A Markdown code span holding ``text`` literally, whatever backticks it contains."""
    text = " ".join(str(text).split("\n"))
    fence = "`"
    while fence in text:
        fence += "`"
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def markdown(summary: dict[str, Any], layers: dict[str, list[dict]]) -> str:
    """``report.md``: the variant table, the pictures (``summary["plots"]``, relative paths), the
    failures, the per-layer int8/fp32 table, skipped files and artifact locations."""
    rows = table(summary)
    out = [f"# qpipe report: {_cell(summary['name'])}", "",
           f"Run {_code(summary['run_id'])}: **{summary['status']}**.", ""]
    data = summary.get("data") or {}
    out += [f"Data: {data.get('classes')} classes, {data.get('train')} training and {data.get('val')} "
            f"validation images, {len(data.get('skipped') or [])} file(s) skipped.", ""]
    if trained_on(summary):
        out += [f"Trained on: {_cell(trained_on(summary))}.", ""]
    out += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows[1:]]
    out += ["", f"Selected: **{_cell(summary.get('selected') or 'none')}**: {summary.get('selection_reason', '')}", ""]
    for kind in FILES:
        if kind in (summary.get("plots") or {}):
            out += [f"## {TITLES[kind]}", "", f"![{TITLES[kind]}]({FILES[kind]})", "", _caption(kind, summary), ""]
    for kind, err in (summary.get("plot_errors") or {}).items():
        out += [f"The {TITLES.get(kind, kind).lower()} plot could not be drawn: {_cell(err)}", ""]
    if summary.get("failures"):
        out += ["## Failures", ""] + [f"- {_code(f['stage'])} ({_cell(f.get('variant') or '-')}): {_cell(f['error'])}"
                                      for f in summary["failures"]] + [""]
    for title, text, rows in sections(summary):
        out += [f"## {_cell(title)}", ""] + [_cell(t) + "\n" for t in text]
        out += ["| " + " | ".join(_cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows[1:]] + [""]
    names, matrix = layer_matrix(layers)
    if names:
        counts = [_counts(layers[n]) for n in names]
        out += ["## Layers: int8 or fp32 in each variant", "",
                "; ".join(f"{_cell(n)}: {i} int8, {f} fp32" for n, (i, f) in zip(names, counts, strict=True)) + ".",
                "", "| layer | type | " + " | ".join(_cell(n) for n in names) + " |",
                "|" + "---|" * (len(names) + 2)]
        out += [f"| {_cell(layer)} | {_cell(', '.join(types))} | " + " | ".join(p or "-" for p in precisions) + " |"
                for layer, types, precisions in matrix] + [""]
    if data.get("skipped"):
        out += ["## Skipped files", ""] + [f"- {_code(s['file'])}: {_cell(s['reason'])}"
                                           for s in data["skipped"][:200]] + [""]
    out += ["## Artifacts", ""]
    for v in ordered(summary):
        if v.get("artifact"):
            out.append(f"- {_cell(v['name'])}: {_code(v['artifact'])} (manifest {_code(v['manifest'])})")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#111827;
 margin:2rem auto;max-width:70rem;padding:0 1rem;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.25rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #e5e7eb}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em;background:#f3f4f6;
 padding:0 .2em;border-radius:3px;word-break:break-all}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d1d5db;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.selected td{background:#fee2e2;font-weight:600}tr.failed td{color:#991b1b}
td.int8{background:#dcfce7}td.fp32{background:#fef3c7}td.absent{color:#9ca3af}
.status{display:inline-block;padding:.05rem .5rem;border-radius:999px;font-weight:600;color:#fff}
.status-SUCCESS{background:#16a34a}.status-FAILED{background:#dc2626}.status-CANCELLED{background:#6b7280}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #e5e7eb}
figcaption{font-size:.85rem;color:#4b5563;max-width:48rem}
.error{color:#991b1b}ul.failures li{margin:.2rem 0}details{margin:.5rem 0}
"""

# scripts, plugins, frames and fonts from anywhere are refused; pictures only from the report's own place
CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

NUMERIC = {"top-1", "drop vs fp32", "size", "int8/fp32 layers"}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_page(summary: dict[str, Any], layers: dict[str, list[dict]]) -> str:
    """``report.html``: the same content as ``markdown``, as one page with inline CSS and no script.
    Every string that comes from the user, the data or an error (names, class names, file names,
    messages, URIs) is HTML-escaped."""
    rows = table(summary)
    status = str(summary.get("status", ""))
    status_class = status if status in ("SUCCESS", "FAILED", "CANCELLED") else "OTHER"
    title = f"qpipe report: {summary.get('name', '')}"
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{_e(title)}</h1>",
           f'<p>Run <code>{_e(summary.get("run_id", ""))}</code>: '
           f'<span class="status status-{status_class}">{_e(status)}</span></p>']
    data = summary.get("data") or {}
    out.append(f"<p>Data: {_e(data.get('classes'))} classes, {_e(data.get('train'))} training and "
               f"{_e(data.get('val'))} validation images, {len(data.get('skipped') or [])} file(s) skipped.</p>")
    if trained_on(summary):
        out.append(f"<p>Trained on: {_e(trained_on(summary))}.</p>")
    if data.get("class_names"):
        out.append(f"<details><summary>Classes ({len(data['class_names'])})</summary><p>" +
                   ", ".join(f"<code>{_e(c)}</code>" for c in data["class_names"]) + "</p></details>")
    header = rows[0]
    out.append('<table class="variants"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) +
               "</tr></thead><tbody>")
    selected_col = header.index("selected")
    for r in rows[1:]:
        cls = "selected" if r[selected_col] == "*" else "failed" if r[header.index("top-1")] == "FAILED" else ""
        cells = "".join(f'<td class="num">{_e(c)}</td>' if h in NUMERIC or h.startswith("p50") else f"<td>{_e(c)}</td>"
                        for h, c in zip(header, r, strict=True))
        out.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    out.append(f"<p>Selected: <strong>{_e(summary.get('selected') or 'none')}</strong>: "
               f"{_e(summary.get('selection_reason', ''))}</p>")
    for kind in FILES:
        if kind in (summary.get("plots") or {}):
            out += [f"<h2>{_e(TITLES[kind])}</h2>",
                    f'<figure><img src="{_e(FILES[kind])}" alt="{_e(TITLES[kind])}">'
                    f"<figcaption>{_e(_caption(kind, summary))}</figcaption></figure>"]
    for kind, err in (summary.get("plot_errors") or {}).items():
        out.append(f'<p class="error">The {_e(TITLES.get(kind, kind).lower())} plot could not be drawn: '
                   f"{_e(err)}</p>")
    if summary.get("failures"):
        out.append('<h2>Failures</h2><ul class="failures">')
        out += [f"<li><code>{_e(f['stage'])}</code> ({_e(f.get('variant') or '-')}): "
                f'<span class="error">{_e(f["error"])}</span></li>' for f in summary["failures"]]
        out.append("</ul>")
    for title, text, rows in sections(summary):
        out.append(f"<h2>{_e(title)}</h2>")
        out += [f"<p>{_e(t)}</p>" for t in text]
        out.append("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in rows[0]) + "</tr></thead><tbody>")
        out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
        out.append("</tbody></table>")
    names, matrix = layer_matrix(layers)
    if names:
        counts = [_counts(layers[n]) for n in names]
        out.append("<h2>Layers: int8 or fp32 in each variant</h2>")
        out.append('<table class="layers"><thead><tr><th>layer</th><th>type</th>' +
                   "".join(f"<th>{_e(n)}<br>{i} int8, {f} fp32</th>" for n, (i, f) in zip(names, counts, strict=True)) +
                   "</tr></thead><tbody>")
        for layer, types, precisions in matrix:
            cells = "".join('<td class="absent">-</td>' if p is None else
                            f'<td class="{"int8" if p.startswith("int8") else "fp32"}">{_e(p)}</td>'
                            for p in precisions)
            out.append(f"<tr><td><code>{_e(layer)}</code></td><td>{_e(', '.join(types))}</td>{cells}</tr>")
        out.append("</tbody></table>")
    if data.get("skipped"):
        out.append(f"<h2>Skipped files</h2><details open><summary>{len(data['skipped'])} file(s)</summary><ul>")
        out += [f"<li><code>{_e(s['file'])}</code>: {_e(s['reason'])}</li>" for s in data["skipped"][:200]]
        out.append("</ul></details>")
    out.append('<h2>Artifacts</h2><p>Next to this page: <a href="summary.json">summary.json</a> and '
               '<a href="report.md">report.md</a>.</p><ul>')
    for v in ordered(summary):
        if v.get("artifact"):
            out.append(f"<li>{_e(v['name'])}: <code>{_e(v['artifact'])}</code> "
                       f"(manifest <code>{_e(v['manifest'])}</code>)</li>")
    out += ["</ul>", "</body>", "</html>"]
    return "\n".join(out) + "\n"
