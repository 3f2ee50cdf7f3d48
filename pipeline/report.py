"""The run's report: ``report.md`` and a self-contained ``report.html`` (inline CSS, no scripts,
no external fonts), both showing the pictures of ``pipeline.plots`` as PNG files next to them by
relative path, so the report's folder can be copied anywhere and still shows them; and the
variant table that the CLI prints.

What the report says is built once, by ``document``, as a list of sections of blocks
(paragraphs, lists, tables, figures) holding plain text. Two Jinja2 templates in
``pipeline/templates`` write that list as Markdown and as HTML; the HTML one is autoescaped, so
every string from the user, the data or an error (names, class names, file names, messages,
URIs) is text on the page, and neither this module nor the templates escape anything by hand.
What is chosen and why (the selection, the baselines, the drops) is ``pipeline.summary``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jinja2

from pipeline.plots import FILES, TITLES
from pipeline.summary import (
    baseline_of,
    is_baseline,
    is_sweep,
    not_measured,
    ordered,
    selection_batch,
    sensitivity_groups,
    served_top1,
    skipped_runtimes,
    trained_on,
)

# the selection policy lives in pipeline.summary; its names stay importable from here (redundant aliases)
from pipeline.summary import choose_runtimes as choose_runtimes
from pipeline.summary import entry as entry
from pipeline.summary import per_batch as per_batch
from pipeline.summary import select as select


def _per_batch(values: dict[str, float], fmt: str) -> str:
    """One figure per batch size in one cell: the figure alone when every batch size has the
    same, else each with its batch size ("0.9777 @1, 0.9749 @32")."""
    if len(set(values.values())) <= 1:
        return format(next(iter(values.values())), fmt) if values else "-"
    return ", ".join(f"{v:{fmt}} @{b}" for b, v in values.items())


def table(summary: dict[str, Any]) -> list[list[str]]:
    """Rows (with a header) of the variant table that the CLI prints and the report shows. A
    sweep's table has arch and set columns, lists each arch's fp32 (FAILED if it was not
    measured) before that arch's variants, and gives each drop against the row's own arch's fp32.
    Top-1, drop and p50 are those of the runtime serving the row at each batch size (named next
    to the p50 unless TorchScript); speedup is the fastest fp32 form's p50 over the row's."""
    batches = [str(b) for b in summary.get("batch_sizes", [])]
    sweep = is_sweep(summary)
    engines = any(v.get("engine") for v in summary.get("variants", []))  # an engine column when another ran

    def engine(v: dict[str, Any]) -> list[str]:
        return [v.get("engine") or ("-" if v.get("method") == "fp32" else "qpipe")] if engines else []

    header = ["variant"] + (["arch", "set"] if sweep else []) + ["method"] + (["engine"] if engines else []) + \
             ["top-1", "drop vs fp32"] + \
             [f"p50 ms @{b}" for b in batches] + [f"speedup @{b}" for b in batches] + \
             ["size", "int8/fp32 layers", "selected"]
    rows = [header]
    listed = ordered(summary)
    if sweep:
        listed = [r for arch, b in summary["baselines"].items() for r in
                  ([b] if b else [{"name": f"fp32@{arch}", "variant": "fp32", "arch": arch, "method": "fp32"}]) +
                  [v for v in summary.get("variants", []) if v.get("arch") == arch]]
    for v in listed:
        where = [v.get("variant", v["name"]), v.get("arch") or "-", v.get("set") or "-"] if sweep else [v["name"]]
        if v.get("accuracy_top1") is None:
            rows.append(where + [v.get("method", "?")] + engine(v) + ["FAILED", "-"] + ["-"] * 2 * len(batches) +
                        ["-", "-", ""])
            continue
        base = baseline_of(summary, v)
        top1 = {b: t for b, t in served_top1(v).items() if b in batches}
        drop = "(baseline)" if is_baseline(summary, v) else "-" if not base else \
            _per_batch({b: base["accuracy_top1"] - t for b, t in top1.items()}, "+.4f")
        speedup = v.get("speedup_vs_fp32") or {}
        layers = "-" if v.get("int8_layers") is None else f"{v['int8_layers']}/{v['fp32_layers']}"
        rows.append(where + [v["method"]] + engine(v) + [_per_batch(top1, ".4f"), drop] +
                    [_latency_cell(v, b) for b in batches] +
                    [f"{speedup[b]:.2f}x" if b in speedup else "-" for b in batches] +
                    [_mb(v["size_bytes"]), layers, "*" if summary.get("selected") == v["name"] else ""])
    return rows


def text_table(summary: dict[str, Any]) -> str:
    rows = table(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)




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
    "size": "Size of each deployable artifact (the TorchScript file that users load; for a variant of another "
            "engine, that engine's model file).",
    "sensitivity": "Each layer measured alone in int8 (every other layer fp32) on the validation split: the top-1 "
                   "it loses and the SQNR of the logits against fp32. The most sensitive layers come first; red "
                   "bars are the layers the accuracy-budget fallback kept in fp32.",
    "training": "Loss and accuracy per epoch on the training split (solid) and the validation split (dashed), "
                "for the fp32 fine-tuning and each QAT variant.",
}


SENSITIVITY_ROWS = 10  # layers listed per variant in the report's sensitivity table
NUMERIC = {"top-1", "drop vs fp32", "size", "int8/fp32 layers"}  # right-aligned in HTML, with p50 and speedup


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _latency_cell(row: dict[str, Any], batch: str) -> str:
    runtime = (row.get("runtime") or {}).get(batch, "torchscript")
    return f"{row['latency_ms_p50'][batch]:.2f}" + ("" if runtime == "torchscript" else f" ({runtime})")


def _ms(value: float) -> str:
    return f"{value:+.2f} ms"


def _counts(rows: list[dict]) -> tuple[int, int]:
    int8 = sum(1 for r in rows if str(r["precision"]).startswith("int8"))
    return int8, len(rows) - int8


def _caption(kind: str, summary: dict[str, Any]) -> str:
    if kind == "accuracy_latency" and is_sweep(summary):
        kind = "accuracy_latency_sweep"
    text = CAPTIONS[kind].format(batch=selection_batch(summary), budget=summary.get("accuracy_budget") or 0.0)
    missing = not_measured(summary)
    if missing and kind != "training":
        text += f" Not shown (no result): {', '.join(missing)}."
    return text


# ------------------------------------------------------------------------------ the document

@dataclass(frozen=True)
class Span:
    """A run of text in a paragraph or list item. ``style``: "" (plain), "code", "strong",
    "status" (the run's status: a coloured badge in HTML, bold in Markdown), "error" (red in
    HTML) or "link" (to the file of that name next to the report; a link in HTML only)."""
    text: str
    style: str = ""


@dataclass(frozen=True)
class Cell:
    """A table cell. ``css`` is its HTML class (num, int8, fp32, absent); ``code`` shows it as
    code in HTML; ``sub`` is a second line of a header cell in HTML."""
    text: str
    css: str = ""
    code: bool = False
    sub: str = ""


@dataclass(kw_only=True)
class Block:
    """What every block has: its HTML class, ``only`` ("md" or "html": shown in that output
    alone, for what one medium says its own way), and ``fold``: in HTML, the block sits in a
    ``<details>`` with this summary, open if ``open``."""
    css: str = ""
    only: str = ""
    fold: str = ""
    open: bool = False


@dataclass(kw_only=True)
class Paragraph(Block):
    kind = "paragraph"
    spans: list[Span]


@dataclass(kw_only=True)
class Items(Block):
    kind = "list"
    items: list[list[Span]]


@dataclass(kw_only=True)
class Table(Block):
    kind = "table"
    header: list[Cell]
    rows: list[list[Cell]]
    row_css: list[str] = field(default_factory=list)  # each row's HTML class, if any


@dataclass(kw_only=True)
class Figure(Block):
    kind = "figure"
    src: str  # a file next to the report
    alt: str
    caption: str


@dataclass
class Section:
    title: str  # empty: no heading
    blocks: list[Block]
    level: int = 2


def _text(text: Any) -> Paragraph:
    return Paragraph(spans=[Span(str(text))])


def _table(rows: list[list[str]], **kw: Any) -> Table:
    """A table of plain cells from rows of strings, the first of them the header."""
    return Table(header=[Cell(h) for h in rows[0]], rows=[[Cell(c) for c in r] for r in rows[1:]], **kw)


def _variant_table(summary: dict[str, Any]) -> Table:
    rows = table(summary)
    header = rows[0]
    numeric = [h in NUMERIC or h.startswith(("p50", "speedup")) for h in header]
    selected, top1 = header.index("selected"), header.index("top-1")
    return Table(css="variants", header=[Cell(h) for h in header],
                 rows=[[Cell(c, "num" if n else "") for c, n in zip(r, numeric, strict=True)] for r in rows[1:]],
                 row_css=["selected" if r[selected] == "*" else "failed" if r[top1] == "FAILED" else ""
                          for r in rows[1:]])


def _overview(summary: dict[str, Any]) -> Section:
    """The report's head: the run and its status, the data, the variant table and the selection."""
    data = summary.get("data") or {}
    blocks: list[Block] = [
        Paragraph(spans=[Span("Run "), Span(str(summary.get("run_id", "")), "code"), Span(": "),
                         Span(str(summary.get("status", "")), "status"), Span(".")]),
        _text(f"Data: {data.get('classes')} classes, {data.get('train')} training and {data.get('val')} "
              f"validation images, {len(data.get('skipped') or [])} file(s) skipped."),
    ]
    if data.get("notes"):
        blocks.append(Items(css="notes", items=[[Span(str(n))] for n in data["notes"]]))
    if trained_on(summary):
        blocks.append(_text(f"Trained on: {trained_on(summary)}."))
    if data.get("class_names"):
        names = [s for c in data["class_names"] for s in (Span(", "), Span(str(c), "code"))][1:]
        blocks.append(Paragraph(only="html", fold=f"Classes ({len(data['class_names'])})", spans=names))
    blocks.append(_variant_table(summary))
    blocks.append(_text(served_note(summary)))
    blocks.append(Paragraph(spans=[Span("Selected: "), Span(str(summary.get("selected") or "none"), "strong"),
                                   Span(f": {summary.get('selection_reason', '')}")]))
    skipped = skipped_lines(summary)
    if skipped:
        blocks.append(Items(css="notes", items=[[Span(line)] for line in skipped]))
    return Section(f"qpipe report: {summary.get('name', '')}", blocks, level=1)


def served_note(summary: dict[str, Any]) -> str:
    """What the table's figures are, and where each fp32 baseline is served (``fp32_served``)."""
    text = ("Top-1, drop and p50 are those of the runtime that serves each model at that batch size (named after "
            "the p50 unless it is TorchScript); the drop is against the fp32 model's top-1 in PyTorch. Speedup: "
            "the fastest fp32 form's p50 over the model's, at the same batch size.")
    served = fp32_served(summary)
    return f"{text} The fp32 baseline's fastest form, which speedups are against: {served}." if served else text


def fp32_served(summary: dict[str, Any]) -> str:
    """Where each fp32 baseline is served, and how much faster than its TorchScript file where
    it is not: "fp32 on onnxruntime @1, torchscript @8 (vs its TorchScript file: 1.52x @1)"."""
    parts = []
    for base in (summary.get("baselines") or {None: summary.get("baseline")}).values():
        if not (base and base.get("runtime")):
            continue
        ts = base.get("speedup_vs_fp32_torchscript") or {}
        faster = [f"{ts[b]:.2f}x @{b}" for b, rt in base["runtime"].items() if rt != "torchscript" and b in ts]
        parts.append(f"{base['name']} on {', '.join(f'{rt} @{b}' for b, rt in base['runtime'].items())}"
                     + (f" (vs its TorchScript file: {', '.join(faster)})" if faster else ""))
    return "; ".join(parts)


def skipped_lines(summary: dict[str, Any]) -> list[str]:
    """One line per runtime that some model was not measured on, with the models and why: what
    the CLI prints and the report lists under the table."""
    return [f"{rt} skipped for {', '.join(names)}: {why}" for rt, why, names in skipped_runtimes(summary)]


def _layer_sections(summary: dict[str, Any]) -> list[Section]:
    """What the accuracy-budget fallback did for each variant that asked for it, each variant's
    runtimes, and each sensitivity analysis's most sensitive layers."""
    out = []
    batches = [str(b) for b in summary.get("batch_sizes", [])]
    fallbacks = [v for v in summary.get("variants", []) if v.get("fallback")]
    if fallbacks:
        text = []
        rows = [["variant", "budget met", "kept fp32", "top-1 drop", "layers tried"] +
                [f"latency cost @{b}" for b in batches]]
        for v in fallbacks:
            fb = v["fallback"]
            order = " (layers taken by top-1 recovered per ms)" if fb.get("order") == "latency" else ""
            text.append(f"{v['name']}: {fb['message']}{order}." + (f" Kept in fp32: {', '.join(fb['kept_fp32'])}."
                                                                    if fb["kept_fp32"] else ""))
            cost = fb.get("latency_cost_ms") or {}
            rows.append([v["name"], "yes" if fb["met"] else "NO", str(len(fb["kept_fp32"])), f"{fb['drop']:+.4f}",
                         str(len(fb["tried"]))] + [_ms(cost[b]) if b in cost else "-" for b in batches])
        text.append("Latency cost: the variant's p50 minus that of the same model with every layer int8, both "
                    "timed by the benchmark stage in the same task.")
        out.append(Section("Accuracy-budget fallback", [*map(_text, text), _table(rows)]))
    measured = [v for v in ordered(summary) if v.get("runtimes") and len(v["runtimes"]) > 1
                or v.get("skipped_runtimes") or v.get("engine")]
    if measured:
        rows = [["variant", "runtime", "top-1"] + [f"p50 ms @{b}" for b in batches] + ["size", "serves"]]
        text = ["Each static variant runs as its TorchScript file in PyTorch and as its ONNX QDQ export (the same "
                "int8 model) on ONNX Runtime and OpenVINO; the fp32 baseline runs as its TorchScript file and as a "
                "float ONNX export. At each batch size a model is served by its fastest runtime whose own top-1 is "
                "within the budget of the fp32 model's top-1 in PyTorch; dynamic and QAT variants run in PyTorch "
                "only. OpenVINO runs float parts at its CPU plugin's default precision, named in brackets (bf16 on "
                "CPUs with AMX)."]
        text += engine_lines(measured)
        for v in measured:
            for rt, m in v.get("runtimes", {}).items():
                serves = [b for b in batches if (v.get("runtime") or {}).get(b) == rt]
                precision = m.get("inference_precision")
                rows.append([v["name"], rt + (f" ({precision})" if precision else ""), f"{m['accuracy_top1']:.4f}"] +
                            [f"{m['latency_ms_p50'][b]:.2f}" for b in batches] +
                            [_mb(m.get("size_bytes")), ", ".join(f"@{b}" for b in serves) or "-"])
            for rt, why in (v.get("skipped_runtimes") or {}).items():
                text.append(f"{v['name']} on {rt}: skipped: {why}")
        out.append(Section("Runtimes", [*map(_text, text), _table(rows)]))
    for names, v in sensitivity_groups(summary):
        sens = v["sensitivity"]
        rows = [["rank", "layer", "top-1 drop alone", "SQNR alone (dB)", "top-1 recovered if kept fp32"]]
        rows += [[str(r["rank"]), r["layer"], f"{r['drop_top1']:+.4f}",
                  "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}", f"{r['recovered_top1']:+.4f}"]
                 for r in sens["ranking"][:SENSITIVITY_ROWS]]
        text = (f"{len(sens['ranking'])} layers measured in {sens['parts']} parts on {sens['val_images']} validation "
                f"images: fp32 top-1 {sens['fp32_accuracy']:.4f}, all int8 {sens['int8_accuracy']:.4f}. "
                f"The {min(SENSITIVITY_ROWS, len(sens['ranking']))} most sensitive are listed; the variant's "
                "benchmark manifest holds every layer.")
        out.append(Section(f"Layer sensitivity: {', '.join(names)}", [_text(text), _table(rows)]))
        if sens.get("latency_ranking"):
            out.append(_latency_ranking(names, sens["latency_ranking"]))
    return out


def _latency_ranking(names: list[str], ranking: list[dict[str, Any]]) -> Section:
    """The second ranking (fallback: latency): top-1 bought back per millisecond each layer costs
    in fp32, next to its place in the sensitivity ranking."""
    rows = [["rank", "layer", "top-1 bought back", "cost ms (fp32 vs int8, batch 1)", "top-1 per ms",
             "sensitivity rank"]]
    rows += [[str(r["latency_rank"]), r["layer"], f"{r['benefit_top1']:+.4f}", f"{r['cost_ms']:+.3f}",
              f"{r['recovered_per_ms']:.4f}", str(r["rank"])] for r in ranking[:SENSITIVITY_ROWS]]
    text = ("The same layers ordered by the top-1 that keeping each in fp32 buys back (the larger of its drop "
            "alone and what it recovers from the all-int8 model) per millisecond it costs: the all-but-that-layer "
            "model's latency minus the all-int8 model's, timed interleaved at batch 1 on one thread. A variant "
            "with fallback: latency keeps layers in this order; with fallback: auto, in the sensitivity order.")
    return Section(f"Layer cost-benefit: {', '.join(names)}", [_text(text), _table(rows)])


def engine_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the report says of the variants quantized by another engine: how their models run,
    then per variant what its engine was asked to do and the graph it made."""
    engines = [v for v in rows if v.get("engine")]
    if not engines:
        return []
    lines = ["A variant with an engine other than qpipe was quantized by that engine from the same fp32 model "
             "(exported as ONNX) and the same calibration images, and runs as the engine's own model, with no "
             "TorchScript form: NNCF's OpenVINO IR on OpenVINO, ONNX Runtime's QDQ file on ONNX Runtime and "
             "OpenVINO. Its top-1 and latency are measured on the same validation images, threads and batch "
             "sizes, and it is selected like any other variant."]
    for v in engines:
        settings = dict(v.get("engine_settings") or {})
        api, versions = settings.pop("api", v["engine"]), settings.pop("versions", {})
        graph = f"{v['quantizers']} activation quantizers, " if v.get("quantizers") is not None else ""
        lines.append(f"{v['name']}: engine {v['engine']}, {api} (" + ", ".join(f"{k} {x}" for k, x in settings.items())
                     + "; " + ", ".join(f"{k} {x}" for k, x in versions.items()) + f"): {graph}"
                     f"{v.get('int8_layers', '?')} int8 and {v.get('fp32_layers', '?')} float conv/linear layers.")
    return lines


def _layer_table(layers: dict[str, list[dict]]) -> list[Section]:
    names, matrix = layer_matrix(layers)
    if not names:
        return []
    counts = [_counts(layers[n]) for n in names]
    header = [Cell("layer"), Cell("type")] + [Cell(n, sub=f"{i} int8, {f} fp32")
                                              for n, (i, f) in zip(names, counts, strict=True)]
    rows = [[Cell(layer, code=True), Cell(", ".join(types))] +
            [Cell("-", "absent") if p is None else Cell(p, "int8" if p.startswith("int8") else "fp32")
             for p in precisions] for layer, types, precisions in matrix]
    in_words = "; ".join(f"{n}: {i} int8, {f} fp32" for n, (i, f) in zip(names, counts, strict=True)) + "."
    # the counts head each column in HTML; a Markdown header cell has no second line
    return [Section("Layers: int8 or fp32 in each variant",
                    [Paragraph(only="md", spans=[Span(in_words)]), Table(css="layers", header=header, rows=rows)])]


def document(summary: dict[str, Any], layers: dict[str, list[dict]]) -> list[Section]:
    """Everything the report says, in order: the overview, the pictures (``summary["plots"]``,
    by relative path) and any that could not be drawn, the failures, the fallback, runtime and
    sensitivity tables, the per-layer int8/fp32 table, skipped files and artifact locations."""
    out = [_overview(summary)]
    if summary.get("warnings"):  # before anything that reads as an answer (pipeline.trust)
        out.append(Section("Warnings: this answer may not be trusted", [Items(css="failures", items=[
            [Span(str(w["kind"]), "code"), Span(": "), Span(str(w["message"]), "error")]
            for w in summary["warnings"]])]))
    for kind in FILES:
        if kind in (summary.get("plots") or {}):
            out.append(Section(TITLES[kind], [Figure(src=FILES[kind], alt=TITLES[kind],
                                                     caption=_caption(kind, summary))]))
    errors = [Paragraph(css="error", spans=[Span(f"The {TITLES.get(kind, kind).lower()} plot could not be drawn: "
                                                 f"{err}")])
              for kind, err in (summary.get("plot_errors") or {}).items()]
    if errors:
        out.append(Section("", errors))
    if summary.get("failures"):
        out.append(Section("Failures", [Items(css="failures", items=[
            [Span(str(f["stage"]), "code"), Span(f" ({f.get('variant') or '-'}): "), Span(str(f["error"]), "error")]
            for f in summary["failures"]])]))
    out += _layer_sections(summary)
    out += _layer_table(layers)
    skipped = (summary.get("data") or {}).get("skipped") or []
    if skipped:
        out.append(Section("Skipped files", [Items(fold=f"{len(skipped)} file(s)", open=True, items=[
            [Span(str(s["file"]), "code"), Span(f": {s['reason']}")] for s in skipped[:200]])]))
    out.append(Section("Artifacts", [
        Paragraph(only="html", spans=[Span("Next to this page: "), Span("summary.json", "link"), Span(" and "),
                                      Span("report.md", "link"), Span(".")]),
        Items(items=[[Span(f"{v['name']}: "), Span(str(v["artifact"]), "code"), Span(" (manifest "),
                      Span(str(v["manifest"]), "code"), Span(")")] for v in ordered(summary) if v.get("artifact")]),
    ]))
    return out


# ------------------------------------------------------------------------------ the writers

def md_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell (and anywhere else in a line)."""
    return " ".join(str(text).split("\n")).replace("|", "\\|")


def md_code(text: Any) -> str:
    """A Markdown code span holding ``text`` literally, whatever backticks it contains."""
    text = " ".join(str(text).split("\n"))
    fence = "`"
    while fence in text:
        fence += "`"
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


@cache
def templates() -> jinja2.Environment:
    """The report's templates (``pipeline/templates``, shipped as package data). Autoescape is
    on for ``*.html.j2`` (and for any other name), off for ``*.md.j2``, whose text goes through
    the ``cell`` and ``code`` filters instead. An undefined name is an error, not blank text."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                            default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["cell"] = md_cell
    env.filters["code"] = md_code
    return env


def markdown(summary: dict[str, Any], layers: dict[str, list[dict]]) -> str:
    """``report.md``: the sections of ``document`` in Markdown, the pictures by relative path."""
    return templates().get_template("report.md.j2").render(sections=document(summary, layers)).rstrip("\n") + "\n"


def html_page(summary: dict[str, Any], layers: dict[str, list[dict]]) -> str:
    """``report.html``: the same sections as ``markdown``, as one page with inline CSS, a content
    security policy that refuses scripts and anything from elsewhere, and every string escaped."""
    sections = document(summary, layers)
    return templates().get_template("report.html.j2").render(title=sections[0].title, sections=sections)
