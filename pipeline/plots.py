"""The report's pictures, as PNG files: accuracy vs latency with the Pareto front and the selected
variant, size per variant, and the training curves of fp32 fine-tuning and of each QAT variant.

Drawing uses matplotlib's object API on an explicit Agg canvas: no pyplot, no display, and no
process-wide backend switch, so importing this module in a worker changes nothing else. Output is
deterministic: fixed sizes and colours, and PNGs without the "Software" text chunk (matplotlib
writes no timestamp in a PNG), so the same summary gives the same bytes.

Each drawing function takes the run summary (``pipeline.summary``) and returns a Figure of
what is there, or None when there is nothing to draw: a failed variant has no point and no bar, a
run without QAT has only the fp32 curve. ``render_all`` writes the PNGs.

A sweep's summary has one fp32 baseline per arch (``baselines``) and rows named ``variant@arch``;
each row is compared with its own arch's baseline, and the accuracy-latency plot gives each arch
a colour and a marker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.summary import (
    baseline_of,
    is_baseline,
    is_sweep,
    measured,
    selection_batch,
    sensitivity_groups,
    served_top1,
)

log = logging.getLogger(__name__)

# file names of the pictures, next to report.md and report.html
FILES = {"accuracy_latency": "accuracy-latency.png", "size": "size.png", "training": "training.png",
         "sensitivity": "sensitivity.png"}
TITLES = {"accuracy_latency": "Accuracy vs latency", "size": "Size per variant", "training": "Training curves",
          "sensitivity": "Layer sensitivity"}
SENSITIVITY_LAYERS = 20  # the most sensitive layers drawn per variant
SENSITIVITY_VARIANTS = 4  # variants drawn (the report's table lists every one)
DPI = 100
SIZES_IN = {"accuracy_latency": (7.0, 4.6), "training": (9.0, 3.6)}  # the size plot grows with its bars
PNG_METADATA = {"Software": None}  # no version string, so the bytes depend on the drawing only

BASELINE_COLOUR = "#6b7280"
VARIANT_COLOUR = "#2563eb"
SELECTED_COLOUR = "#dc2626"
FRONT_COLOUR = "#16a34a"
SERIES = ("#2563eb", "#ea580c", "#9333ea", "#0d9488", "#ca8a04", "#db2777", "#4b5563", "#65a30d")
ARCH_MARKERS = ("o", "^", "D", "v", "P", "X", "<", ">")  # variants of the n-th arch of a sweep; fp32 is a square


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points that no other point beats on both counts (lower
    or equal latency and higher or equal accuracy, one of them strictly), fastest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG without version or time metadata."""
    fig.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)
    return path


def accuracy_latency(summary: dict[str, Any]) -> Any | None:
    """Top-1 against p50 latency at the selection batch size, one point per measured model (the
    form that serves it at that batch: its runtime's latency and its runtime's top-1), the Pareto
    front as a step line, the accuracy budget's floor and the selected variant ringed.

    In a sweep each arch has its colour and marker (its fp32 a square), and there is no single
    floor: each arch has its own, so a variant is drawn filled when its drop against its own
    arch's fp32 is within the budget and hollow when it is not."""
    batch = selection_batch(summary)
    rows = [r for r in measured(summary) if batch and r.get("latency_ms_p50", {}).get(batch) is not None]
    if not rows:
        return None
    pts = [(float(r["latency_ms_p50"][batch]), float(served_top1(r).get(batch, r["accuracy_top1"]))) for r in rows]
    base = summary.get("baseline")
    selected = summary.get("selected")
    fig = _figure(*SIZES_IN["accuracy_latency"])
    ax = fig.add_subplot()
    xs = [p[0] for p in pts]
    right = max(xs) * 1.25 if max(xs) > 0 else 1.0
    front = pareto_front(pts)
    # the best accuracy reachable within each latency: a staircase through the front, run out to the right edge
    fx = [pts[i][0] for i in front] + [right]
    fy = [pts[i][1] for i in front] + [pts[front[-1]][1]]
    ax.step(fx, fy, where="post", color=FRONT_COLOUR, linewidth=1.5, alpha=0.8, label="Pareto front", zorder=1)
    sweep = is_sweep(summary)
    budget = summary.get("accuracy_budget")
    archs = list(summary.get("baselines") or {})
    # the legend names each arch at its first variant (its marker), or at its fp32 if it has none
    named = {}
    for i, r in enumerate(rows):
        if r.get("arch") not in named or is_baseline(summary, rows[named[r.get("arch")]]):
            named[r.get("arch")] = i
    for n, (r, (x, y)) in enumerate(zip(rows, pts, strict=True)):
        is_base = is_baseline(summary, r)
        if sweep:
            k = archs.index(r.get("arch")) if r.get("arch") in archs else 0
            colour = SERIES[k % len(SERIES)]
            drop = (r.get("accuracy_drop_served") or {}).get(batch, r.get("accuracy_drop"))
            within = is_base or (budget is not None and drop is not None and drop <= float(budget) + 1e-12)
            label = str(r.get("arch")) if named.get(r.get("arch")) == n else None
            marker = "s" if is_base else ARCH_MARKERS[k % len(ARCH_MARKERS)]
            ax.scatter([x], [y], s=60 if is_base else 45, marker=marker,
                       facecolors=colour if within else "none", edgecolors=colour, linewidths=1.5, zorder=3,
                       label=label)
        else:
            ax.scatter([x], [y], s=60 if is_base else 45, marker="s" if is_base else "o",
                       color=BASELINE_COLOUR if is_base else VARIANT_COLOUR, zorder=3,
                       label="fp32 baseline" if is_base else None)
        # alternate label offsets so variants with equal results stay readable
        ax.annotate(str(r["name"]), (x, y), xytext=(7, 6 + 11 * (n % 3)), textcoords="offset points",
                    fontsize=8, color="#111827", arrowprops={"arrowstyle": "-", "color": "#9ca3af", "lw": 0.6})
        if r["name"] == selected and not is_base:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors=SELECTED_COLOUR, linewidths=2, zorder=4,
                       label=f"selected: {r['name']}")
    ys = [p[1] for p in pts]
    if sweep:  # legend entries for the encoding, drawn as empty series
        ax.scatter([], [], s=60, marker="s", facecolors=BASELINE_COLOUR, edgecolors=BASELINE_COLOUR,
                   label="square: the arch's fp32")
        if budget is not None:
            ax.scatter([], [], s=45, marker="o", facecolors="none", edgecolors=BASELINE_COLOUR, linewidths=1.5,
                       label=f"hollow: drop > {float(budget):g} vs its fp32")
    elif base is not None and budget is not None:
        floor = float(base["accuracy_top1"]) - float(budget)
        ax.axhline(floor, color=SELECTED_COLOUR, linestyle=":", linewidth=1,
                   label=f"accuracy budget (fp32 - {float(budget):g})")
        ys.append(floor)
    pad = max(0.01, (max(ys) - min(ys)) * 0.15)
    ax.set_ylim(min(ys) - pad, min(1.0 + pad / 2, max(ys) + pad * 2))
    ax.set_xlim(0, right)
    ax.set_xlabel(f"p50 latency at batch {batch} (ms, lower is better)")
    ax.set_ylabel("top-1 accuracy (higher is better)")
    ax.set_title(f"{TITLES['accuracy_latency']}: {summary.get('name', '')}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best" if sweep else "lower right")
    return fig


def sizes(summary: dict[str, Any]) -> Any | None:
    """One horizontal bar per measured model: its artifact size in MB, and how much smaller than
    the fp32 baseline it is."""
    rows = [r for r in measured(summary) if r.get("size_bytes")]
    if not rows:
        return None
    fig = _figure(7.0, 1.2 + 0.42 * len(rows))
    ax = fig.add_subplot()
    names = [str(r["name"]) for r in rows]
    mb = [r["size_bytes"] / 1e6 for r in rows]
    colours = [BASELINE_COLOUR if is_baseline(summary, r) else SELECTED_COLOUR if r["name"] == summary.get("selected")
               else VARIANT_COLOUR for r in rows]
    ys = list(range(len(rows)))
    ax.barh(ys, mb, color=colours, height=0.6)
    ax.set_yticks(ys, labels=names, fontsize=8)
    ax.invert_yaxis()  # the summary's order, top to bottom
    for y, r, v in zip(ys, rows, mb, strict=True):
        text = f"{v:.2f} MB"
        base = baseline_of(summary, r)  # in a sweep, its own arch's fp32
        base_size = base.get("size_bytes") if base and base.get("accuracy_top1") is not None else None
        if base_size and not is_baseline(summary, r):
            ratio = base_size / r["size_bytes"]
            text += (" (as fp32)" if abs(ratio - 1) < 0.05 else f" ({ratio:.1f}x smaller than fp32)" if ratio > 1
                     else f" ({1 / ratio:.1f}x larger than fp32)")
        ax.annotate(text, (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, max(mb) * 1.45)
    ax.set_xlabel("artifact size (MB)")
    ax.set_title(TITLES["size"] + (" (red: selected)" if summary.get("selected") else ""), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def training(history: dict[str, list[dict[str, Any]]]) -> Any | None:
    """Loss and accuracy per epoch, training (solid) and validation (dashed), for each trained
    model: the fp32 fine-tuning (``fp32``) and every QAT variant. QAT starts from the fine-tuned
    fp32 model, so its epochs are drawn after the fp32 ones, past a dotted line. In a sweep the
    names end in ``@arch``, and a QAT variant follows its own arch's ``fp32@arch``."""
    series = {name: h for name, h in (history or {}).items() if h}
    if not series:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(*SIZES_IN["training"])
    loss_ax, acc_ax = fig.subplots(1, 2)
    def fp32_of(name: str) -> str:  # the fine-tuning a model started from: fp32, or fp32@arch in a sweep
        return "fp32" + name[name.index("@"):] if "@" in name else "fp32"

    ends = {name: max((e["epoch"] for e in h), default=0) for name, h in series.items() if fp32_of(name) == name}
    fp32_epochs = max(ends.values(), default=0)
    for n, (name, epochs) in enumerate(series.items()):
        colour = SERIES[n % len(SERIES)]
        x = [e["epoch"] + (0 if name == fp32_of(name) else ends.get(fp32_of(name), 0)) for e in epochs]
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            for split, style in (("train", "-"), ("val", "--")):
                y = [e.get(f"{split}_{metric}") for e in epochs]
                if any(v is None for v in y):
                    continue
                ax.plot(x, y, linestyle=style, marker="o", markersize=3, color=colour, label=f"{name} {split}")
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        if fp32_epochs and len(series) > 1:
            ax.axvline(fp32_epochs + 0.5, color=BASELINE_COLOUR, linestyle=":", linewidth=1)
        ax.set_xlabel("epoch (QAT continues from fp32)" if fp32_epochs and len(series) > 1 else "epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    loss_ax.set_title("loss per epoch (solid: train, dashed: val)", fontsize=10)
    acc_ax.set_title("accuracy per epoch", fontsize=10)
    acc_ax.legend(fontsize=7, loc="lower right")
    return fig


def sensitivity(summary: dict[str, Any]) -> Any | None:
    """For each sensitivity analysis, its most sensitive layers, most sensitive on top: the top-1
    drop with the layer alone in int8 (left) and the logits' SQNR against fp32 (right, lower is
    worse). Layers that ``fallback: auto`` kept in fp32 are red."""
    groups = sensitivity_groups(summary)[:SENSITIVITY_VARIANTS]
    if not groups:
        return None
    shown = [v["sensitivity"]["ranking"][:SENSITIVITY_LAYERS] for _, v in groups]
    fig = _figure(9.0, 0.9 + sum(0.22 * len(r) + 0.5 for r in shown))
    grid = fig.add_gridspec(len(groups), 2, height_ratios=[len(r) + 2 for r in shown])
    for i, ((names, v), ranking) in enumerate(zip(groups, shown, strict=True)):
        kept = set((v.get("fallback") or {}).get("kept_fp32", []))
        colours = [SELECTED_COLOUR if r["layer"] in kept else VARIANT_COLOUR for r in ranking]
        ys = list(range(len(ranking)))
        drop_ax, sqnr_ax = fig.add_subplot(grid[i, 0]), fig.add_subplot(grid[i, 1])
        drop_ax.barh(ys, [100 * r["drop_top1"] for r in ranking], color=colours, height=0.6)
        sqnr_ax.barh(ys, [r["sqnr_db"] if r["sqnr_db"] is not None else 0.0 for r in ranking], color=colours,
                     height=0.6)
        drop_ax.set_yticks(ys, labels=[f"{r['rank']}. {r['layer']}" for r in ranking], fontsize=7)
        sqnr_ax.set_yticks(ys, labels=[""] * len(ys))
        for ax in (drop_ax, sqnr_ax):
            ax.invert_yaxis()
            ax.grid(True, axis="x", alpha=0.3)
            ax.tick_params(axis="x", labelsize=7)
        drop_ax.set_title(f"{', '.join(names)}: top-1 drop alone in int8 (points)", fontsize=9)
        sqnr_ax.set_title("logit SQNR vs fp32 (dB, lower is worse)" + ("; red: kept fp32" if kept else ""),
                          fontsize=9)
    return fig


# kind -> a function of the summary returning a matplotlib Figure, or None when there is nothing to draw
DRAW: dict[str, Callable[[dict[str, Any]], Any | None]] = {
    "accuracy_latency": accuracy_latency,
    "size": sizes,
    "training": lambda summary: training(summary.get("history") or {}),
    "sensitivity": sensitivity,
}


def render_all(summary: dict[str, Any], folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Draw every picture that has data into ``folder``; returns ({kind: path}, {kind: error}).

    A picture that cannot be drawn is reported, not raised: the report stage writes the run's
    summary after this, and a plotting bug must not cost the user the summary of an hour's run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for kind, draw in DRAW.items():
        try:
            fig = draw(summary)
            if fig is None:
                continue
            written[kind] = save(fig, folder / FILES[kind])
        except Exception as err:  # see the docstring: logged with its traceback, named in the report
            log.exception("the %s plot could not be drawn", kind)
            errors[kind] = f"{type(err).__name__}: {err}"
    return written, errors
