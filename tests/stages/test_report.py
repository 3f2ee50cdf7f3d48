"""The report stage: it joins whatever the benchmarks produced into one summary, selects the
fastest variant within the accuracy budget, and renders the table, plot, Markdown and HTML.

Here on hand-made stage results (the report stage reads only manifests), so no model is trained.
More of the report stage (templates, escaping, failures, the page in a browser) is in
tests/test_report.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.plots import accuracy_latency
from pipeline.report import choose_runtimes, per_batch, select, table
from pipeline.stages import execute, manifest_key
from pipeline.store import FileStore
from tests.test_report import _bench_manifest

ARCHS = ["resnet18", "mobilenet_v2"]


# ----------------------------------------------------------------------------------- sweeps

def test_report_stage_measures_each_drop_against_its_own_arch(tmp_path: Path) -> None:
    """mobilenet_v2's fp32 is far below resnet18's: against its own it loses 0.005 (within the
    budget of 0.01), against resnet18's it would lose 0.155. The fastest model, dynamic on
    mobilenet_v2, loses 0.1 against its own fp32 and is not eligible."""
    store = FileStore(tmp_path)
    store.put_json(manifest_key("ingest", "data0"), {"stage": "ingest", "key": "data0", "classes": ["a", "b"],
                                                     "sizes": {"train": 8, "val": 2}, "skipped": []})
    results = {  # display name -> (arch, set, method, top-1, p50 at batch 1); dynamic@resnet18 never came
        "fp32@resnet18": ("resnet18", None, "fp32", 0.95, 5.0),
        "ptq@resnet18": ("resnet18", "ptq", "static", 0.945, 2.0),
        "dynamic@resnet18": ("resnet18", "dyn", "dynamic", None, None),
        "fp32@mobilenet_v2": ("mobilenet_v2", None, "fp32", 0.80, 3.0),
        "ptq@mobilenet_v2": ("mobilenet_v2", "ptq", "static", 0.795, 1.0),
        "dynamic@mobilenet_v2": ("mobilenet_v2", "dyn", "dynamic", 0.70, 0.5),
    }
    inputs = {"data": {"stage": "ingest", "key": "data0", "id": "ingest"}}
    variants = []
    for name, (arch, set_name, method, acc, p50) in results.items():
        key = f"b-{name.replace('@', '-')}"
        variants.append({"name": name, "method": method, "arch": arch, "set": set_name})
        inputs[f"bench_{name}"] = {"stage": "benchmark", "key": key, "id": f"benchmark:{name}"}
        if acc is not None:  # the benchmark's own name is the variant's, without the arch
            store.put_json(manifest_key("benchmark", key),
                           _bench_manifest(key, name.split("@")[0], method, acc, p50, 1_000_000))
    node = {"id": "report", "stage": "report", "variant": None, "key": "report0", "inputs": inputs,
            "input_digests": {}, "config": {"name": "grid", "accuracy_budget": 0.01, "batch_sizes": [1, 8],
                                            "variants": variants}}
    s = execute(node, store, run_id="grid-1").manifest["summary"]
    assert list(s["baselines"]) == ARCHS and s["baseline"] == s["baselines"]["resnet18"]
    assert s["baselines"]["mobilenet_v2"]["name"] == "fp32@mobilenet_v2"
    rows = {v["name"]: v for v in s["variants"]}
    assert list(rows) == [n for n in results if not n.startswith("fp32")]
    assert rows["ptq@mobilenet_v2"]["accuracy_drop"] == pytest.approx(0.005)
    assert rows["dynamic@mobilenet_v2"]["accuracy_drop"] == pytest.approx(0.10)
    assert rows["ptq@resnet18"]["accuracy_drop"] == pytest.approx(0.005)
    assert {(v["variant"], v["arch"], v["set"]) for v in rows.values()} == {
        ("ptq", "resnet18", "ptq"), ("dynamic", "resnet18", "dyn"), ("ptq", "mobilenet_v2", "ptq"),
        ("dynamic", "mobilenet_v2", "dyn")}
    assert rows["dynamic@resnet18"]["accuracy_top1"] is None and s["status"] == "FAILED"
    assert s["selected"] == "ptq@mobilenet_v2", s["selection_reason"]
    assert "2 variant(s)" in s["selection_reason"]
    # one table: every baseline and variant, each arch's fp32 first, drops against its own fp32
    rows_out = table(s)
    assert rows_out[0][:6] == ["variant", "arch", "set", "method", "top-1", "drop vs fp32"]
    assert [r[:3] for r in rows_out[1:]] == [["fp32", "resnet18", "-"], ["ptq", "resnet18", "ptq"],
                                             ["dynamic", "resnet18", "dyn"], ["fp32", "mobilenet_v2", "-"],
                                             ["ptq", "mobilenet_v2", "ptq"], ["dynamic", "mobilenet_v2", "dyn"]]
    assert [r[5] for r in rows_out[1:]] == ["(baseline)", "+0.0050", "-", "(baseline)", "+0.0050", "+0.1000"]
    assert [r[-1] for r in rows_out[1:]] == ["", "", "", "", "*", ""]
    # one plot: every model labelled name@arch, no single budget line, the out-of-budget point hollow
    ax = accuracy_latency(s).axes[0]
    assert [t.get_text() for t in ax.texts] == [n for n in results if n != "dynamic@resnet18"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"resnet18", "mobilenet_v2", "selected: ptq@mobilenet_v2"} <= set(legend)
    assert not any(label.startswith("accuracy budget") for label in legend)
    hollow = [c for c in ax.collections if len(c.get_offsets()) == 1 and len(c.get_facecolors()) == 0]
    assert {tuple(c.get_offsets()[0]) for c in hollow} == {(0.5, 0.70), (1.0, 0.795)}  # and the selection ring
    md = store.get_bytes(store.key_of(s["report"])).decode()
    assert "| ptq | mobilenet_v2 | ptq | static | 0.7950 | +0.0050 |" in md
    assert "so no single budget line is drawn" in md and "Not shown (no result): dynamic@resnet18." in md
    page = store.get_bytes(store.key_of(s["report_html"])).decode()
    assert page.count('<tr class="failed">') == 1 and page.count('<tr class="selected">') == 1


# ------------------------------------------------------------------------------- selection

def row(name: str, acc: float, p50: dict[str, float], base: float | None = 0.90) -> dict:
    """A variant row as the report stage makes it: its drop against its own fp32 baseline."""
    drop = None if base is None else base - acc
    return {"name": name, "method": "static", "accuracy_top1": acc, "latency_ms_p50": p50, "accuracy_drop": drop}


def test_select_picks_the_fastest_within_budget() -> None:
    variants = [
        row("slow-ok", 0.90, {"1": 6.0, "32": 40.0}),
        row("fast-ok", 0.895, {"1": 4.0, "32": 50.0}),
        row("fastest-but-inaccurate", 0.70, {"1": 1.0, "32": 10.0}),
        row("exactly-on-budget", 0.89, {"1": 5.0, "32": 30.0}),
    ]
    name, reason = select(variants, 0.01, "1")
    assert name == "fast-ok"
    assert "batch 1" in reason and "3 variant(s)" in reason and "on torchscript" in reason
    name, _ = select(variants, 0.01, "32")  # the batch size picks the latency column
    assert name == "exactly-on-budget"
    name, _ = select(variants, 0.5, "1")
    assert name == "fastest-but-inaccurate"
    better = [row("better", 0.95, {"1": 9.0, "32": 99.0})]  # more accurate than fp32 is within budget
    assert select(better, 0.0, "1")[0] == "better"
    # each row against its own baseline (a sweep): 0.80 is within budget of a 0.805 fp32
    assert select([row("other-arch", 0.80, {"1": 0.5}, base=0.805)] + variants, 0.01, "1")[0] == "other-arch"


def test_select_none_when_all_exceed_the_budget() -> None:
    variants = [row("a", 0.80, {"1": 1.0}), row("b", 0.85, {"1": 2.0}),
                {"name": "failed", "method": "qat", "accuracy_top1": None}]
    name, reason = select(variants, 0.01, "1")
    assert name is None and "budget" in reason
    assert select([], 0.01, "1")[0] is None
    name, reason = select([row("a", 0.80, {"1": 1.0}, base=None)], 1.0, "1")
    assert name is None and "baseline" in reason


def test_each_batch_size_is_served_by_the_fastest_runtime_within_budget() -> None:
    r = row("v", 0.90, {"1": 4.0, "32": 40.0})
    r["latency_ms_p95"], r["throughput_ips"] = {"1": 5.0, "32": 50.0}, {"1": 250.0, "32": 800.0}
    metrics = {"latency_ms_p95": {"1": 1.0, "32": 1.0}, "throughput_ips": {"1": 1.0, "32": 1.0}}
    r["runtimes"] = {"torchscript": {"accuracy_top1": 0.90, "latency_ms_p50": {"1": 4.0, "32": 40.0}, **metrics},
                     "onnxruntime": {"accuracy_top1": 0.90, "latency_ms_p50": {"1": 2.0, "32": 60.0}, **metrics},
                     "openvino": {"accuracy_top1": 0.85, "latency_ms_p50": {"1": 1.0, "32": 10.0}, **metrics}}
    choose_runtimes(r, 0.90, 0.01)  # openvino is fastest but loses 5 points: never chosen
    assert r["runtime"] == {"1": "onnxruntime", "32": "torchscript"}
    assert r["latency_ms_p50"] == {"1": 2.0, "32": 40.0} and r["latency_ms_p95"] == {"1": 1.0, "32": 50.0}
    choose_runtimes(r, 0.90, 0.1)
    assert r["runtime"] == {"1": "openvino", "32": "openvino"}
    picks = per_batch([r], 0.1, [1, 32])
    assert picks == {"1": {"variant": "v", "runtime": "openvino", "latency_ms_p50": 1.0, "accuracy_top1": 0.85},
                     "32": {"variant": "v", "runtime": "openvino", "latency_ms_p50": 10.0, "accuracy_top1": 0.85}}
