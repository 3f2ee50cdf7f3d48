"""The report: its pictures (pipeline.plots), report.md and the self-contained report.html
(pipeline.report), and the report stage writing them next to summary.json. Everything runs in
process on hand-made benchmark results; the last test opens the written report in headless
Chromium and checks that every picture loads and that hostile names stay text.
"""

from __future__ import annotations

import contextlib
import fnmatch
import html
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.data import calibration_note
from pipeline.plots import FILES, accuracy_latency, pareto_front, render_all, sizes, training
from pipeline.report import html_page, layer_matrix, markdown, table
from pipeline.stages import execute, manifest_key
from pipeline.store import FileStore

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)

# strings that come from users or their data and would be markup if not escaped
HOSTILE = {
    "class": '<img src=x onerror="document.title=\'pwned\'">',
    "class2": "</code></td></tr><b>bold</b> & 'quotes' \"double\"",
    "file": "evil/<script>document.title='pwned'</script>|`tick`.png",
    "reason": "not an image: <iframe src=\"javascript:alert(1)\"></iframe>",
    "error": "<svg onload=alert(1)> failed & stopped",
    "layer": "layer1.<i>0</i>.conv1",
    "note": "data.calib_size <b>is</b> more than the <em>training</em> images & more",
}


def bench_row(name: str, method: str, acc: float | None, p50_1: float, size: int,
              int8: int | None = 21, fp32: int | None = 0) -> dict:
    return {"name": name, "method": method, "accuracy_top1": acc,
            "latency_ms_p50": {"1": p50_1, "8": p50_1 * 6}, "latency_ms_p95": {"1": p50_1 * 1.1, "8": p50_1 * 7},
            "throughput_ips": {"1": 1000 / p50_1, "8": 8000 / (p50_1 * 6)}, "size_bytes": size,
            "int8_layers": int8, "fp32_layers": fp32, "artifact": f"file:///store/{name}/model.ts",
            "sha256": "0" * 64, "format": "torchscript", "manifest": f"file:///store/{name}/manifest.json"}


def epochs(n: int, start_loss: float, start_acc: float) -> list[dict]:
    return [{"epoch": i, "train_loss": start_loss / i, "val_loss": start_loss * 1.1 / i,
             "train_accuracy": min(1.0, start_acc + 0.1 * i), "val_accuracy": min(1.0, start_acc + 0.08 * i)}
            for i in range(1, n + 1)]


def sensitivity_rows(names: list[str]) -> list[dict]:
    return [{"layer": n, "index": i, "rank": i + 1, "drop_top1": 0.05 / (i + 1), "sqnr_db": 5.0 + 10 * i,
             "all_but_top1": 0.95, "all_but_sqnr_db": 20.0, "recovered_top1": 0.01 / (i + 1)}
            for i, n in enumerate(names)]


def make_summary() -> dict:
    """A run with four measured variants (one with a sensitivity analysis and the fallback), one
    failed variant, fp32 and QAT training curves."""
    base = bench_row("fp32", "fp32", 0.96, 5.5, 44_700_000, None, None)
    histogram = bench_row("ptq-histogram", "static", 0.962, 2.4, 11_300_000, 20, 1)
    histogram["sensitivity"] = {"ranking": sensitivity_rows([HOSTILE["layer"], "conv1", "fc"]), "parts": 2,
                                "val_images": 20, "fp32_accuracy": 0.96, "int8_accuracy": 0.94}
    histogram["fallback"] = {"mode": "auto", "budget": 0.01, "met": True, "kept_fp32": [HOSTILE["layer"]],
                             "drop": -0.002, "tried": [{"kept": 0}, {"kept": 1}],
                             "message": "within the budget of 0.0100 with 1 layer(s) kept in fp32",
                             "latency_cost_ms": {"1": 0.25, "8": 1.5}}
    return {
        "run_id": "demo-1234", "name": "demo", "status": "FAILED", "baseline": base,
        "variants": [bench_row("ptq-minmax", "static", 0.958, 2.3, 11_300_000),
                     histogram,
                     bench_row("dynamic", "dynamic", 0.96, 4.8, 44_690_000, 1, 20),
                     bench_row("qat", "qat", 0.94, 2.2, 11_300_000),
                     {"name": "broken", "method": "static", "accuracy_top1": None, "status": "FAILED"}],
        "selected": "ptq-minmax", "selection_reason": "fastest at batch 1", "accuracy_budget": 0.01,
        "batch_sizes": [1, 8],
        "data": {"classes": 2, "class_names": [HOSTILE["class"], HOSTILE["class2"]], "train": 80, "val": 20,
                 "skipped": [{"file": HOSTILE["file"], "reason": HOSTILE["reason"]}], "notes": [HOSTILE["note"]]},
        "failures": [{"stage": "quantize", "variant": "broken", "error": HOSTILE["error"]}],
        "history": {"fp32": epochs(3, 2.0, 0.5), "qat": epochs(2, 0.4, 0.8)},
    }


LAYERS = {
    "ptq-minmax": [{"layer": "conv1", "type": "ConvReLU2d", "precision": "int8"},
                   {"layer": HOSTILE["layer"], "type": "Conv2d", "precision": "int8"},
                   {"layer": "fc", "type": "Linear", "precision": "int8"}],
    "dynamic": [{"layer": "conv1", "type": "Conv2d", "precision": "fp32"},
                {"layer": HOSTILE["layer"], "type": "Conv2d", "precision": "fp32"},
                {"layer": "fc", "type": "Linear", "precision": "int8-dynamic"}],
    "fp32": [],
}


def png_info(data: bytes) -> dict:
    """Width, height and chunk types of a PNG, and the keys of its text chunks."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, texts = 8, [], []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        chunks.append(kind.decode())
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            texts.append(body.split(b"\0", 1)[0].decode("latin-1"))
        pos += 12 + length
    width, height = struct.unpack(">II", data[16:24])
    return {"width": width, "height": height, "chunks": chunks, "texts": texts}


# ------------------------------------------------------------------------------ the pictures

def test_pareto_front_keeps_only_undominated_points() -> None:
    pts = [(1.0, 0.5), (2.0, 0.9), (2.0, 0.8), (3.0, 0.9), (0.5, 0.4), (4.0, 0.95)]
    assert pareto_front(pts) == [4, 0, 1, 5]  # fastest first; (2, .8) and (3, .9) are beaten by (2, .9)
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0]  # a tie is drawn once
    assert pareto_front([(1.0, 0.9), (2.0, 0.5)]) == [0]  # the fastest is also the most accurate
    assert pareto_front([]) == []


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_accuracy_latency_marks_the_selected_variant_and_skips_failures() -> None:
    s = make_summary()
    fig = accuracy_latency(s)
    ax = fig.axes[0]
    assert _texts(fig) == ["fp32", "ptq-minmax", "ptq-histogram", "dynamic", "qat"]  # no point for "broken"
    legend = _legend(ax)
    assert "selected: ptq-minmax" in legend and "fp32 baseline" in legend and "Pareto front" in legend
    assert any(label.startswith("accuracy budget") for label in legend)
    [front] = [line for line in ax.lines if line.get_label() == "Pareto front"]
    # qat (2.2 ms) is fastest, ptq-histogram (2.4 ms) the most accurate, ptq-minmax between them on
    # both; dynamic and fp32 are slower and no more accurate. The staircase runs on to the right edge.
    assert list(front.get_xdata())[:-1] == [2.2, 2.3, 2.4]
    assert list(front.get_ydata()) == [0.94, 0.958, 0.962, 0.962]
    assert front.get_xdata()[-1] == ax.get_xlim()[1]
    assert "batch 1" in ax.get_xlabel()
    budget = [line for line in ax.lines if line.get_label().startswith("accuracy budget")][0]
    assert budget.get_ydata()[0] == pytest.approx(0.96 - 0.01)
    # the latency of the selection batch (the first of batch_sizes) is what is drawn
    s["batch_sizes"] = [8, 1]
    assert "batch 8" in accuracy_latency(s).axes[0].get_xlabel()


def test_accuracy_latency_plots_the_top1_of_the_form_that_serves_each_point() -> None:
    """A variant served on OpenVINO at the plotted batch is drawn at OpenVINO's top-1, not at its
    TorchScript top-1 (the point's latency is already the served form's)."""
    s = make_summary()
    row = next(v for v in s["variants"] if v["name"] == "ptq-minmax")
    row["accuracy_top1_served"] = {"1": 0.9777, "8": 0.9749}
    ax = accuracy_latency(s).axes[0]
    points = {t.get_text(): t.xy for t in ax.texts}
    assert points["ptq-minmax"][1] == pytest.approx(0.9777)
    assert points["ptq-histogram"][1] == pytest.approx(0.962)  # no served top-1: its one top-1


def test_pictures_without_baseline_qat_or_any_result() -> None:
    s = make_summary()
    s["baseline"], s["selected"] = None, None
    fig = accuracy_latency(s)
    assert "fp32" not in _texts(fig)
    legend = _legend(fig.axes[0])
    assert not any(label.startswith(("accuracy budget", "selected", "fp32")) for label in legend)
    assert [t.get_text() for t in sizes(s).axes[0].get_yticklabels()] == ["ptq-minmax", "ptq-histogram",
                                                                          "dynamic", "qat"]
    # no QAT: only the fp32 curve
    fig = training({"fp32": epochs(3, 2.0, 0.5)})
    assert _legend(fig.axes[1]) == ["fp32 train", "fp32 val"]
    # with QAT, its epochs follow the fp32 ones
    fig = training(make_summary()["history"])
    by_label = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines if line.get_label()[0] != "_"}
    assert by_label["fp32 train"] == [1, 2, 3] and by_label["qat val"] == [4, 5]
    assert training({}) is None and training({"fp32": []}) is None
    nothing = make_summary()
    nothing["baseline"] = None
    nothing["variants"] = [v for v in nothing["variants"] if v["accuracy_top1"] is None]
    nothing["history"] = {}
    assert accuracy_latency(nothing) is None and sizes(nothing) is None


def test_render_all_is_fast_deterministic_and_free_of_metadata(tmp_path: Path) -> None:
    s = make_summary()
    first, errors = render_all(s, tmp_path / "a")
    assert errors == {} and set(first) == set(FILES)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    second, _ = render_all(s, tmp_path / "b")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"render_all: {cpu:.2f}s cpu, {wall:.2f}s wall")
    assert cpu < 2.0, f"drawing the report's pictures took {cpu:.2f}s of CPU"
    for kind, path in first.items():
        data = path.read_bytes()
        assert path.name == FILES[kind]
        assert data == second[kind].read_bytes(), f"{kind} differs between two renderings"
        info = png_info(data)
        assert info["width"] >= 600 and info["height"] >= 200
        assert "tIME" not in info["chunks"] and "Software" not in info["texts"], info


def test_a_plot_that_fails_is_reported_and_the_others_are_drawn(tmp_path: Path) -> None:
    s = make_summary()
    s["baseline"]["latency_ms_p50"]["1"] = "not measured"
    drawn, errors = render_all(s, tmp_path)
    assert set(errors) == {"accuracy_latency"} and "ValueError" in errors["accuracy_latency"]
    assert set(drawn) == {"size", "training", "sensitivity"} and not (tmp_path / FILES["accuracy_latency"]).exists()


# ------------------------------------------------------------------------------ the documents

class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "span", "details",
                "summary", "table", "thead", "tbody", "tr", "th", "td", "br", "strong", "figure", "img",
                "figcaption", "ul", "li", "a"}


def test_html_escapes_every_user_string_and_loads_nothing_from_outside() -> None:
    s = make_summary()
    s["name"] = "<title>spec</title>"
    s["run_id"] = "run-<b>1</b>"
    s["variants"][0]["name"] = s["selected"] = 'ptq"><script>x()</script>'
    s["plots"] = {"size": "file:///store/runs/x/size.png", "training": "file:///store/runs/x/training.png"}
    page = html_page(s, LAYERS)
    parsed = Collect()
    parsed.feed(page)
    assert parsed.tags <= ALLOWED_TAGS, parsed.tags - ALLOWED_TAGS
    assert "<script" not in page.lower() and "<iframe" not in page.lower() and "<svg" not in page.lower()
    assert not [a for a in parsed.attrs if a[1].startswith("on")]
    text = "".join(parsed.text)
    for value in [*HOSTILE.values(), s["name"], s["run_id"], s["selected"]]:
        assert value in text, f"{value!r} is not shown as text"
    # pictures by relative path, next to the page; links only to files next to it
    assert {v for t, k, v in parsed.attrs if t == "img" and k == "src"} == {"size.png", "training.png"}
    assert {v for t, k, v in parsed.attrs if t == "a" and k == "href"} == {"summary.json", "report.md"}
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", page) and "@import" not in page and "url(" not in page
    [csp] = [v for t, k, v in parsed.attrs if t == "meta" and k == "content" and "default-src" in (v or "")]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "could not be drawn" not in page
    s["plot_errors"] = {"accuracy_latency": "ValueError: <bad>"}
    assert "accuracy vs latency plot could not be drawn: ValueError: &lt;bad&gt;" in html_page(s, LAYERS)


def test_markdown_shows_the_pictures_and_the_layer_table() -> None:
    s = make_summary()
    s["plots"] = {k: f"file:///store/runs/demo-1234/{f}" for k, f in FILES.items()}
    md = markdown(s, LAYERS)
    for f in FILES.values():
        assert f"]({f})" in md
    assert "Not shown (no result): broken." in md
    assert "| layer | type | ptq-minmax | dynamic |" in md  # fp32 has no layer table: no column
    assert "| conv1 | ConvReLU2d, Conv2d | int8 | fp32 |" in md
    assert "| fc | Linear | int8 | int8-dynamic |" in md
    assert "ptq-minmax: 3 int8, 0 fp32; dynamic: 1 int8, 2 fp32." in md
    # a file name with a '|' and a backtick stays one list item, in a code span that holds it literally
    assert "- `` evil/<script>document.title='pwned'</script>|`tick`.png ``: not an image" in md
    rows = [line for line in md.splitlines() if line.startswith("| broken ")]
    assert rows and rows[0].count("|") == 12  # eleven columns: p50 and speedup at each of the two batch sizes
    del s["plots"]
    assert "![" not in markdown(s, LAYERS)


def test_every_report_template_ships_as_package_data() -> None:
    """An installed qpipe reads its templates from the package: each one in pipeline/templates
    must match the package-data globs in pyproject.toml, or the wheel leaves it out."""
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline"]
    found = sorted(p.relative_to(root / "pipeline").as_posix() for p in (root / "pipeline" / "templates").iterdir())
    assert {"templates/report.html.j2", "templates/report.md.j2"} <= set(found)
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in found), (found, globs)


def test_layer_matrix_lines_up_variants_with_different_layers() -> None:
    names, rows = layer_matrix({"a": [{"layer": "x", "type": "Conv2d", "precision": "int8"}],
                                "b": [{"layer": "y", "type": "Linear", "precision": "fp32"},
                                      {"layer": "x", "type": "ConvReLU2d", "precision": "int8"}],
                                "c": []})
    assert names == ["a", "b"]
    assert rows == [("x", ["Conv2d", "ConvReLU2d"], ["int8", "int8"]), ("y", ["Linear"], [None, "fp32"])]


# ------------------------------------------------------------------------------ the stage

def _bench_manifest(key: str, name: str, method: str, acc: float, p50: float, size: int, *,
                    layers: list | None = None, history: list | None = None) -> dict:
    row = bench_row(name, method, acc, p50, size)
    return {"stage": "benchmark", "key": key, "name": name, "method": method, "format": "torchscript",
            "metrics": {k: row[k] for k in ("accuracy_top1", "latency_ms_p50", "latency_ms_p95", "throughput_ips",
                                            "size_bytes")},
            "int8_layers": None if layers is None else sum(r["precision"].startswith("int8") for r in layers),
            "fp32_layers": None if layers is None else sum(r["precision"] == "fp32" for r in layers),
            "layers": layers or [], "history": history or [],
            "outputs": {"model": {"uri": f"file:///somewhere/{name}/model.ts", "sha256": "ab" * 32, "size": size}}}


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The report stage run by ``execute`` over hand-made ingest and benchmark manifests: fp32,
    two static variants, QAT with training curves, and a variant whose benchmark never came."""
    store = FileStore(tmp_path_factory.mktemp("store"))
    data = {"stage": "ingest", "key": "data0", "classes": [HOSTILE["class"], "cat"],
            "sizes": {"train": 80, "val": 20}, "skipped": [{"file": HOSTILE["file"], "reason": HOSTILE["reason"]}],
            "notes": [calibration_note(1000, 80)]}
    store.put_json(manifest_key("ingest", "data0"), data)
    benches = {
        "fp32": _bench_manifest("b-fp32", "fp32", "fp32", 0.95, 5.0, 44_000_000, history=epochs(3, 2.0, 0.4)),
        "ptq-a": _bench_manifest("b-a", "ptq-a", "static", 0.948, 2.0, 11_000_000, layers=LAYERS["ptq-minmax"]),
        "ptq-b": _bench_manifest("b-b", "ptq-b", "static", 0.90, 1.5, 11_000_000, layers=LAYERS["ptq-minmax"]),
        "qat": _bench_manifest("b-q", "qat", "qat", 0.951, 2.1, 11_000_000, layers=LAYERS["ptq-minmax"],
                               history=epochs(2, 0.3, 0.85)),
    }
    for b in benches.values():
        store.put_json(manifest_key("benchmark", b["key"]), b)
    variants = [{"name": n, "method": b["method"]} for n, b in benches.items()] + [
        {"name": "gone", "method": "dynamic"}]
    keys = {v["name"]: benches[v["name"]]["key"] if v["name"] in benches else "b-gone" for v in variants}
    inputs = {"data": {"stage": "ingest", "key": "data0", "id": "ingest"}}
    inputs |= {f"bench_{n}": {"stage": "benchmark", "key": k, "id": f"benchmark:{n}"} for n, k in keys.items()}
    node = {"id": "report", "stage": "report", "variant": None, "key": "report0", "inputs": inputs,
            "input_digests": {}, "config": {"name": "demo", "accuracy_budget": 0.01, "batch_sizes": [1, 8],
                                            "variants": variants}}
    t0 = time.perf_counter()
    result = execute(node, store, run_id="demo-1", extra={"failures": [
        {"stage": "quantize", "variant": "gone", "error": HOSTILE["error"]}]})
    seconds = time.perf_counter() - t0
    return {"store": store, "manifest": result.manifest, "summary": result.manifest["summary"], "seconds": seconds}


def test_report_stage_stores_html_and_pictures_next_to_the_markdown(stage_run: dict) -> None:
    store, s, manifest = stage_run["store"], stage_run["summary"], stage_run["manifest"]
    print(f"report stage: {stage_run['seconds']:.2f}s")
    assert s["status"] == "FAILED" and s["selected"] == "ptq-a"  # ptq-b is faster but outside the budget
    # no variant of this run has a sensitivity analysis (tests/stages/test_sensitivity.py draws one)
    assert set(s["plots"]) == set(FILES) - {"sensitivity"} and "plot_errors" not in s
    folder = "runs/demo-1"
    assert s["report"] == store.url(f"{folder}/report.md") and s["report_html"] == store.url(f"{folder}/report.html")
    for kind, uri in s["plots"].items():
        assert uri == store.url(f"{folder}/{FILES[kind]}")
        ref = manifest["outputs"]["plots"][kind]
        data = store.get_bytes(store.key_of(uri))
        assert ref["uri"] == uri and ref["size"] == len(data) and png_info(data)["width"] > 0
    assert store.get_json(f"{folder}/summary.json") == s  # the stored summary lists the same files
    assert manifest["outputs"]["report_html"]["uri"] == s["report_html"]
    page = store.get_bytes(f"{folder}/report.html").decode()
    srcs = set(re.findall(r'<img src="([^"]+)"', page))
    assert srcs == {FILES[k] for k in s["plots"]} and all(store.exists(f"{folder}/{src}") for src in srcs)
    assert html.escape(HOSTILE["error"]) in page and HOSTILE["error"] not in page
    md = store.get_bytes(f"{folder}/report.md").decode()
    assert "](training.png)" in md and "gone" in md


def test_report_shows_the_notes_of_the_ingest(stage_run: dict) -> None:
    """The ingest's notes (here: calib_size over the training split) reach the summary's data
    and both documents; a run without notes has no notes list."""
    store, s = stage_run["store"], stage_run["summary"]
    note = "data.calib_size=1000 is more than the 80 training images: calibrated on all 80; set data.calib_size " \
           "to 80 or less, or add images"
    assert s["data"]["notes"] == [note]
    assert f"- {note}" in store.get_bytes("runs/demo-1/report.md").decode().splitlines()
    assert f'<ul class="notes">\n<li>{note}</li>\n</ul>' in store.get_bytes("runs/demo-1/report.html").decode()
    quiet = make_summary()
    del quiet["data"]["notes"]
    assert "- data.calib_size" not in markdown(quiet, {}) and 'class="notes"' not in html_page(quiet, {})


def _run_chromium(url: str, profile: Path, timeout: float = 90) -> str:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--allow-file-access-from-files", f"--user-data-dir={profile}",
           "--window-size=1280,2000", "--dump-dom", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {timeout}s")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its helper processes too
        proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


# Opens two copies of the report in frames and reads them from outside: the report itself holds no
# script (and its CSP would refuse one), so it is tested exactly as written.
HARNESS = """<!DOCTYPE html>
<html><head><meta charset="utf-8"></head><body>
<iframe id="intact" src="intact/report.html" width="1280" height="900"></iframe>
<iframe id="broken" src="broken/report.html" width="1280" height="900"></iframe>
<pre id="result">no result</pre>
<script>
function inspect(id) {
  const doc = document.getElementById(id).contentDocument;
  if (!doc || !doc.body) return {error: "cannot read frame " + id};
  const all = [...doc.querySelectorAll("*")];
  const row = doc.querySelector("tr.selected td");
  return {
    images: [...doc.images].map(i => ({src: i.getAttribute("src"), complete: i.complete,
                                        width: i.naturalWidth, height: i.naturalHeight})),
    tags: [...new Set(all.map(e => e.tagName.toLowerCase()))],
    handlers: all.flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith("on")),
    text: doc.body.textContent,
    title: doc.title,
    selectedBackground: row ? getComputedStyle(row).backgroundColor : null,
  };
}
window.addEventListener("load", () => {
  document.getElementById("result").textContent =
    JSON.stringify({intact: inspect("intact"), broken: inspect("broken")});
});
</script></body></html>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium')")
def test_report_html_renders_in_headless_chromium(stage_run: dict, tmp_path: Path) -> None:
    store = stage_run["store"]
    src = store.root / "runs" / "demo-1"
    # copied elsewhere, the folder still shows its pictures; a copy missing one shows the check can fail
    shutil.copytree(src, tmp_path / "intact")
    shutil.copytree(src, tmp_path / "broken")
    (tmp_path / "broken" / FILES["size"]).unlink()
    (tmp_path / "harness.html").write_text(HARNESS)
    t0 = time.perf_counter()
    dom = _run_chromium((tmp_path / "harness.html").as_uri(), tmp_path / "profile")
    print(f"chromium: {time.perf_counter() - t0:.2f}s")
    m = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    result = json.loads(html.unescape(m.group(1)))
    intact, broken = result["intact"], result["broken"]
    assert "error" not in intact and "error" not in broken, result
    drawn = [FILES[k] for k in stage_run["summary"]["plots"]]
    want = {f: png_info((src / f).read_bytes()) for f in drawn}
    assert sorted(i["src"] for i in intact["images"]) == sorted(drawn)
    for img in intact["images"]:
        assert img["complete"] and img["width"] == want[img["src"]]["width"], img
        assert img["height"] == want[img["src"]]["height"], img
    loaded = {i["src"]: i["width"] > 0 for i in broken["images"]}
    assert loaded == {f: f != FILES["size"] for f in drawn}
    # hostile names are text, not elements or handlers, and nothing ran
    assert set(intact["tags"]) <= ALLOWED_TAGS, intact["tags"]
    assert intact["handlers"] == [] and intact["title"] == "qpipe report: demo"
    for value in (HOSTILE["class"], HOSTILE["file"], HOSTILE["reason"], HOSTILE["error"], HOSTILE["layer"]):
        assert value in intact["text"], value
    # the inline CSS applies under the page's content security policy
    assert intact["selectedBackground"] not in (None, "rgba(0, 0, 0, 0)", "transparent"), intact


def test_the_report_stage_survives_a_broken_plot(tmp_path: Path) -> None:
    """A training history the curves cannot be drawn from still gives summary.json, report.md,
    report.html and the other pictures; the report names the plot that failed."""
    store = FileStore(tmp_path / "store")
    store.put_json(manifest_key("ingest", "d"), {"classes": ["a", "b"], "sizes": {"train": 8, "val": 2},
                                                 "skipped": []})
    bench = _bench_manifest("b", "fp32", "fp32", 0.9, 3.0, 1000, history=[{"loss": 1.0}])  # no epoch number
    store.put_json(manifest_key("benchmark", "b"), bench)
    node = {"id": "report", "stage": "report", "variant": None, "key": "r", "input_digests": {},
            "inputs": {"data": {"stage": "ingest", "key": "d", "id": "ingest"},
                       "bench_fp32": {"stage": "benchmark", "key": "b", "id": "benchmark:fp32"}},
            "config": {"name": "demo", "accuracy_budget": 0.01, "batch_sizes": [1],
                       "variants": [{"name": "fp32", "method": "fp32"}]}}
    s = execute(node, store, run_id="r-2").manifest["summary"]
    assert s["status"] == "SUCCESS"
    assert set(s["plots"]) == {"accuracy_latency", "size"} and set(s["plot_errors"]) == {"training"}
    assert "KeyError" in s["plot_errors"]["training"]
    assert store.get_json("runs/r-2/summary.json")["plot_errors"] == s["plot_errors"]
    page = store.get_bytes("runs/r-2/report.html").decode()
    assert "training curves plot could not be drawn: KeyError" in page
    assert not store.exists(f"runs/r-2/{FILES['training']}")


# ------------------------------------------------------------------------------ runtimes in the summary

MISSING_OPENVINO = "the openvino runtime needs the Python package 'openvino' (No module named 'openvino'): " \
                   "pip install 'qpipe[runtimes]'"


def _forms_manifest(name: str, method: str, forms: dict[str, tuple[float, float, float]],
                    skipped: dict[str, str] | None = None) -> dict:
    """A benchmark manifest measured on several runtimes: {runtime: (top-1, p50 @1, p50 @8)};
    TorchScript's are the manifest's metrics, as the benchmark stage writes them."""
    measured = {rt: {"accuracy_top1": top1, "latency_ms_p50": {"1": p1, "8": p8},
                     "latency_ms_p95": {"1": p1 * 1.1, "8": p8 * 1.1}, "throughput_ips": {"1": 1e3 / p1, "8": 8e3 / p8},
                     "size_bytes": 1000, "artifact": f"file:///store/{name}/model.{rt}",
                     **({"inference_precision": "bf16"} if rt == "openvino" else {})}
                for rt, (top1, p1, p8) in forms.items()}
    ts = measured["torchscript"]
    return {"name": name, "method": method, "format": "torchscript", "runtimes": measured,
            "metrics": {k: ts[k] for k in ("accuracy_top1", "latency_ms_p50", "latency_ms_p95", "throughput_ips",
                                           "size_bytes")},
            **({"skipped_runtimes": skipped} if skipped else {}),
            "outputs": {"model": {"uri": f"file:///store/{name}/model.ts", "sha256": "ab" * 32, "size": 1000}}}


def runtimes_summary() -> dict:
    """fp32 fastest on ONNX Runtime at batch 1 and on OpenVINO at batch 8; ptq-minmax served on
    OpenVINO, whose top-1 (0.9777) is not its TorchScript one (0.9749); ptq-ov-only out of the
    budget in TorchScript (its fastest form at batch 1) but within it on OpenVINO, the fastest
    model at batch 8; ptq-no-ov measured without OpenVINO, with the reason."""
    from pipeline.stages.configs import ReportConfig
    from pipeline.summary import build

    benches = {
        "fp32": _forms_manifest("fp32", "fp32", {"torchscript": (0.9760, 5.0, 30.0),
                                                 "onnxruntime": (0.9760, 2.5, 20.0),
                                                 "openvino": (0.9750, 3.0, 12.0)}),
        "ptq-minmax": _forms_manifest("ptq-minmax", "static", {"torchscript": (0.9749, 2.0, 12.0),
                                                               "onnxruntime": (0.9700, 1.5, 9.0),
                                                               "openvino": (0.9777, 1.0, 6.0)}),
        "ptq-ov-only": _forms_manifest("ptq-ov-only", "static", {"torchscript": (0.9500, 0.5, 8.0),
                                                                 "openvino": (0.9700, 1.2, 4.0)}),
        "ptq-no-ov": _forms_manifest("ptq-no-ov", "static", {"torchscript": (0.9740, 2.2, 14.0),
                                                             "onnxruntime": (0.9740, 1.8, 10.0)},
                                     skipped={"openvino": MISSING_OPENVINO}),
    }
    cfg = ReportConfig(name="rt", accuracy_budget=0.01, batch_sizes=[1, 8],
                       variants=[{"name": n, "method": b["method"]} for n, b in benches.items()])
    return build(cfg, None, benches, [], run_id="rt-1")


def test_fp32_is_served_on_its_fastest_runtime_and_speedups_are_against_it() -> None:
    s = runtimes_summary()
    base = s["baseline"]
    assert base["runtime"] == {"1": "onnxruntime", "8": "openvino"}
    assert base["latency_ms_p50"] == {"1": 2.5, "8": 12.0}
    assert base["accuracy_top1_served"] == {"1": 0.9760, "8": 0.9750} and base["accuracy_top1"] == 0.9760
    assert base["speedup_vs_fp32"] == {"1": 1.0, "8": 1.0}
    assert base["speedup_vs_fp32_torchscript"] == {"1": 2.0, "8": 2.5}
    rows = {v["name"]: v for v in s["variants"]}
    ptq = rows["ptq-minmax"]
    assert ptq["runtime"] == {"1": "openvino", "8": "openvino"}
    assert ptq["speedup_vs_fp32"] == {"1": 2.5, "8": 2.0}  # fp32's fastest form, not its TorchScript file
    assert ptq["speedup_vs_fp32_torchscript"] == {"1": 5.0, "8": 5.0}
    assert s["selection_per_batch"]["1"] == {"variant": "ptq-minmax", "runtime": "openvino", "latency_ms_p50": 1.0,
                                             "accuracy_top1": 0.9777, "speedup_vs_fp32": 2.5}


def test_every_row_shows_the_top1_of_the_runtime_that_serves_it() -> None:
    s = runtimes_summary()
    rows = {v["name"]: v for v in [s["baseline"], *s["variants"]]}
    for name, v in rows.items():
        for b, rt in v["runtime"].items():
            assert v["accuracy_top1_served"][b] == v["runtimes"][rt]["accuracy_top1"], (name, b, rt)
    ptq = rows["ptq-minmax"]
    # the old keys keep their meaning (the PyTorch form's), the served ones are new
    assert (ptq["accuracy_top1"], ptq["accuracy_top1_served"]) == (0.9749, {"1": 0.9777, "8": 0.9777})
    assert ptq["accuracy_drop"] == pytest.approx(0.9760 - 0.9749)
    assert ptq["accuracy_drop_served"] == pytest.approx({"1": 0.9760 - 0.9777, "8": 0.9760 - 0.9777})
    # out of the budget in TorchScript (0.026), within it on OpenVINO: served there even where TorchScript is
    # faster, and eligible, judged on the form that serves it
    ov_only = rows["ptq-ov-only"]
    assert ov_only["runtime"] == {"1": "openvino", "8": "openvino"} and ov_only["latency_ms_p50"]["1"] == 1.2
    assert ov_only["accuracy_drop"] == pytest.approx(0.026) and ov_only["accuracy_drop_served"]["8"] < 0.01
    assert s["selected"] == "ptq-minmax" and s["selection_per_batch"]["8"]["variant"] == "ptq-ov-only"
    assert "on openvino, top-1 0.9777" in s["selection_reason"]

    table_rows = {r[0]: r for r in table(s)}
    header = table(s)[0]
    col = {h: header.index(h) for h in header}
    assert table_rows["ptq-minmax"][col["top-1"]] == "0.9777" and table_rows["ptq-minmax"][col["drop vs fp32"]] == \
        "-0.0017"
    assert table_rows["ptq-minmax"][col["p50 ms @1"]] == "1.00 (openvino)"
    assert table_rows["ptq-minmax"][col["speedup @1"]] == "2.50x" and table_rows["fp32"][col["speedup @8"]] == "1.00x"
    assert table_rows["fp32"][col["top-1"]] == "0.9760 @1, 0.9750 @8"
    assert table_rows["ptq-ov-only"][col["top-1"]] == "0.9700" and table_rows["ptq-ov-only"][col["drop vs fp32"]] == \
        "+0.0060"
    md = markdown(s, {})
    assert "| ptq-minmax | static | 0.9777 | -0.0017 | 1.00 (openvino) | 6.00 (openvino) | 2.50x | 2.00x |" in md
    assert "| fp32 | openvino (bf16) | 0.9750 | 3.00 | 12.00 | 0.00 MB | @8 |" in md  # the Runtimes table
    assert "fastest form, which speedups are against: fp32 on onnxruntime @1, openvino @8 (vs its TorchScript " \
           "file: 2.00x @1, 2.50x @8)." in md


def test_the_cli_summary_and_the_report_say_which_runtimes_were_skipped_and_why() -> None:
    from workers.cli import print_summary

    s = runtimes_summary()
    out = io.StringIO()
    print_summary(s, out=out)
    printed = out.getvalue().splitlines()
    assert f"runtime openvino skipped for ptq-no-ov: {MISSING_OPENVINO}" in printed, printed
    assert any(line.startswith("top-1 and p50: the runtime serving each model") and "(fp32 on onnxruntime @1, "
               "openvino @8 (vs its TorchScript file: 2.00x @1, 2.50x @8))" in line for line in printed), printed
    assert f"- openvino skipped for ptq-no-ov: {MISSING_OPENVINO}" in markdown(s, {}).splitlines()
    # one line per runtime and reason, naming every model it was skipped for
    s["baseline"]["skipped_runtimes"] = {"openvino": MISSING_OPENVINO}
    out = io.StringIO()
    print_summary(s, out=out)
    assert [line for line in out.getvalue().splitlines() if line.startswith("runtime ")] == \
        [f"runtime openvino skipped for fp32, ptq-no-ov: {MISSING_OPENVINO}"]
    for row in [s["baseline"], *s["variants"]]:
        row.pop("skipped_runtimes", None)
    out = io.StringIO()
    print_summary(s, out=out)
    assert "runtime openvino" not in out.getvalue() and "openvino skipped" not in markdown(s, {})
