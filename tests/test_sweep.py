"""Sweeps: several archs and named sets of variants, run as one grid with one report.

The spec's refusals; the plan (one ingest, a finetune per arch, ids that carry the arch, and keys
equal to those of the same arch and variant without a sweep); the canvas (every node once, each
after its inputs); and one tiny sweep of two archs run in process. The report stage on a grid
(each drop against its own arch's fp32, the selection over the whole grid) is in
tests/stages/test_report.py.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
from celery import group

from pipeline.errors import SpecError
from pipeline.plan import build_plan
from pipeline.report import markdown, text_table
from pipeline.runner import run_in_process
from pipeline.sources import prepare_sources
from pipeline.spec import BenchmarkSpec, load_spec, parse_spec
from pipeline.store import FileStore
from tests.helpers import plan_of
from workers.app import create_app
from workers.canvas import build_canvas
from workers.cli import print_summary

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["resnet18", "mobilenet_v2"]
SETS = {
    "ptq": [{"name": "ptq-minmax", "method": "static", "observer": "minmax", "fallback": "auto"},
            {"name": "ptq-histogram", "method": "static", "observer": "histogram"}],
    "dynamic": [{"name": "dynamic", "method": "dynamic"}],
    "qat": [{"name": "qat", "method": "qat", "epochs": 1}],
}
SWEEP = {"name": "sweep-test", "data": {"source": "builtin:digits", "image_size": 32},
         "finetune": {"epochs": 1}, "quantize": {"sensitivity_parts": 2},
         "sweep": {"archs": ARCHS, "variant_sets": SETS}, "benchmark": {"batch_sizes": [1, 8]}}
DYNAMIC = [{"name": "d", "method": "dynamic"}]


def edited(**changes: object) -> dict:
    """SWEEP with top-level sections replaced (None removes one)."""
    spec = copy.deepcopy(SWEEP)
    for k, v in changes.items():
        if v is None:
            spec.pop(k, None)
        else:
            spec[k] = v
    return spec


# ------------------------------------------------------------------------------------- spec

# (id, spec, substrings of the refusal: the field first)
REFUSED = [
    ("empty-sweep", edited(sweep={}), ["sweep:", "empty sweep"]),
    ("unknown-arch", edited(sweep={"archs": ["resnt18"], "variant_sets": SETS}),
     ["sweep.archs", "resnt18", "did you mean resnet18"]),
    ("arch-twice", edited(sweep={"archs": ["resnet18", "resnet18"], "variant_sets": SETS}),
     ["sweep.archs", "listed twice"]),
    ("name-in-two-sets", edited(sweep={"variant_sets": {"a": DYNAMIC, "b": [{"name": "d", "method": "static"}]}}),
     ["sweep.variant_sets", "'d'", "sets 'a' and 'b'", "unique across all variant sets"]),
    # an identical definition in two sets is refused too: one name, one row per arch
    ("same-variant-in-two-sets", edited(sweep={"variant_sets": {"a": DYNAMIC, "b": DYNAMIC}}),
     ["sweep.variant_sets", "'d'", "list a variant in one set only"]),
    ("name-twice-in-a-set", edited(sweep={"variant_sets": {"a": DYNAMIC * 2}}), ["sweep.variant_sets", "in set 'a'"]),
    ("empty-set", edited(sweep={"variant_sets": {"a": []}}), ["sweep.variant_sets", "'a' is empty"]),
    ("set-name-slash", edited(sweep={"variant_sets": {"a/b": DYNAMIC}}), ["sweep.variant_sets", "a/b"]),
    ("bad-variant-in-set", edited(sweep={"variant_sets": {"a": [{"name": "d", "method": "dynamic",
                                                                 "observer": "mse"}]}}),
     ["sweep.variant_sets.a.0", "observer"]),
    ("variants-in-both-places", edited(quantize={"variants": DYNAMIC}), ["quantize.variants", "sweep.variant_sets"]),
    ("no-variants-anywhere", edited(sweep={"archs": ARCHS}, quantize=None), ["quantize:", "missing"]),
    ("quantize-without-variants", edited(sweep=None, quantize={"backend": "x86"}), ["quantize.variants", "missing"]),
    ("model-arch-not-first", edited(model={"arch": "mobilenet_v2"}), ["model.arch", "sweep.archs[0] ('resnet18')"]),
    ("named-weights-several-archs", edited(model={"weights": "DEFAULT"}), ["model.weights", "null", "2"]),
    ("checkpoint-several-archs", edited(model={"weights": "/models/resnet.pt"}), ["model.weights", "one arch"]),
]


@pytest.mark.parametrize(("spec", "expected"), [pytest.param(s, x, id=i) for i, s, x in REFUSED])
def test_refused_sweep_names_the_field(spec: dict, expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    text = str(info.value)
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"
    assert any(p.startswith(expected[0]) for p in info.value.problems), info.value.problems
    assert len(info.value.problems) == 1, info.value.problems  # one problem, reported once


def test_accepted_sweeps_fill_in_what_they_leave_out() -> None:
    spec = parse_spec(SWEEP)
    assert spec.archs() == ARCHS and spec.model.arch == "resnet18"  # sweep.archs replaces model.arch
    assert list(spec.variant_sets()) == ["ptq", "dynamic", "qat"] and spec.quantize.variants is None
    assert [v.name for v in spec.variants()] == ["ptq-minmax", "ptq-histogram", "dynamic", "qat"]
    assert [v.name for v in spec.static_variants()] == ["ptq-minmax", "ptq-histogram"]
    # archs only: quantize.variants is the one (unnamed) set
    archs_only = parse_spec(edited(sweep={"archs": ["mobilenet_v2"]}, quantize={"variants": DYNAMIC}))
    assert archs_only.model.arch == "mobilenet_v2" and list(archs_only.variant_sets()) == [None]
    # sets only: model.arch is the one arch
    sets_only = parse_spec(edited(sweep={"variant_sets": {"a": DYNAMIC}}, model={"arch": "mobilenet_v2"}))
    assert sets_only.archs() == ["mobilenet_v2"]
    # one arch may use named weights, checked against that arch (resnet18 has no IMAGENET1K_V2)
    one = parse_spec(edited(sweep={"archs": ["mobilenet_v2"], "variant_sets": SETS},
                            model={"weights": "IMAGENET1K_V2"}))
    assert one.model.weights == "IMAGENET1K_V2"
    assert parse_spec(edited(model={"arch": "resnet18"})).archs() == ARCHS  # model.arch may repeat sweep.archs[0]
    # a dumped spec validates again to the same spec
    assert parse_spec(spec.model_dump(mode="json")) == spec


def test_example_sweep_loads() -> None:
    spec = load_spec(ROOT / "examples" / "sweep.yaml")
    assert spec.archs() == ["resnet18", "mobilenet_v2"] and spec.data.image_size == 32
    assert {s: [v.name for v in vs] for s, vs in spec.variant_sets().items()} == {
        "ptq": ["ptq-minmax", "ptq-histogram"], "dynamic": ["dynamic"]}


# ------------------------------------------------------------------------------------- plan



def test_plan_runs_every_variant_on_every_arch_after_one_ingest(plan_store: FileStore) -> None:
    plan = plan_of(SWEEP, plan_store)
    by_id = {n["id"]: n for n in plan}
    assert len(by_id) == len(plan)
    assert [n["id"] for n in plan if n["stage"] == "ingest"] == ["ingest"]
    assert [n["id"] for n in plan if n["stage"] == "finetune"] == [f"finetune@{a}" for a in ARCHS]
    for arch in ARCHS:
        assert by_id[f"finetune@{arch}"]["config"]["arch"] == arch
        assert by_id[f"benchmark:fp32@{arch}"]["variant"] == f"fp32@{arch}"
        assert {by_id[f"calibrate:{o}@{arch}"]["inputs"]["model"]["id"] for o in ("minmax", "histogram")} == \
            {f"finetune@{arch}"}
        for name, producer in (("ptq-minmax", "quantize"), ("ptq-histogram", "quantize"), ("dynamic", "quantize"),
                               ("qat", "qat")):
            node = by_id[f"{producer}:{name}@{arch}"]
            assert node["variant"] == f"{name}@{arch}" and node["inputs"]["model"]["id"] == f"finetune@{arch}"
            assert by_id[f"benchmark:{name}@{arch}"]["inputs"]["model"]["id"] == node["id"]
        # the fallback's sensitivity parts, per arch
        parts = [by_id[f"sensitivity:ptq-minmax@{arch}:{i}"] for i in range(2)]
        assert {k: d["id"] for k, d in by_id[f"quantize:ptq-minmax@{arch}"]["inputs"].items()
                if k.startswith("sensitivity_")} == {f"sensitivity_{i}": p["id"] for i, p in enumerate(parts)}
    report = by_id["report"]
    assert report["config"]["variants"] == [
        {"name": f"{v}@{a}", "method": m, "arch": a, "set": s} for a in ARCHS for v, m, s in (
            ("fp32", "fp32", None), ("ptq-minmax", "static", "ptq"), ("ptq-histogram", "static", "ptq"),
            ("dynamic", "dynamic", "dynamic"), ("qat", "qat", "qat"))]
    assert set(report["inputs"]) == {"data"} | {f"bench_{v['name']}" for v in report["config"]["variants"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_sweep_keys_are_the_keys_without_a_sweep(plan_store: FileStore, arch: str) -> None:
    """A node's key is its content address: the same arch and variant planned without a sweep
    (model.arch, quantize.variants) has the same key, so a sweep reuses earlier single-arch runs."""
    sweep = plan_of(SWEEP, plan_store)
    plain_spec = edited(sweep=None, model={"arch": arch},
                        quantize={"sensitivity_parts": 2, "variants": [v for vs in SETS.values() for v in vs]})
    plain = {n["id"]: n["key"] for n in plan_of(plain_spec, plan_store)}
    mine = {n["id"].replace(f"@{arch}", ""): n["key"] for n in sweep if n["id"] == "ingest" or f"@{arch}" in n["id"]}
    assert set(mine) == set(plain) - {"report"}
    assert mine == {i: plain[i] for i in mine}


# ----------------------------------------------------------------------------------- canvas

def _walk(sig, done: frozenset[str], seen: list[str], nodes: dict[str, dict]) -> frozenset[str]:
    """Visit a canvas in execution order: check that each task's inputs have finished before it
    starts, record it, and return what has finished once ``sig`` has."""
    if sig.task == "celery.chord":  # (chain() builds a private subclass: go by the task name)
        header = _walk(group(sig.tasks), done, seen, nodes)
        return _walk(sig.body, header, seen, nodes)
    if sig.task == "celery.group":
        out = done
        for task in sig.tasks:
            out |= _walk(task, done, seen, nodes)
        return out
    if sig.task == "celery.chain":
        for task in sig.tasks:
            done = _walk(task, done, seen, nodes)
        return done
    node = sig.args[1]
    missing = {d["id"] for d in node["inputs"].values()} - done
    assert not missing, f"{node['id']} can start before {missing}"
    assert sig.task == f"qpipe.{node['stage']}" and sig.options["queue"] == nodes[node["id"]]["queue"]
    seen.append(node["id"])
    return done | {node["id"]}


def test_canvas_holds_every_node_once_after_its_inputs(plan_store: FileStore) -> None:
    plan = plan_of(SWEEP, plan_store)
    canvas = build_canvas(create_app("redis://127.0.0.1:1/0"), plan, "run-1", "file:///store")
    seen: list[str] = []
    _walk(canvas, frozenset(), seen, {n["id"]: n for n in plan})
    assert sorted(seen) == sorted(n["id"] for n in plan)  # each exactly once
    # ingest -> chord(group(one branch per finetune), report)
    assert canvas.task == "celery.chain" and canvas.tasks[0].args[1]["id"] == "ingest"
    body = canvas.tasks[-1]
    assert body.task == "celery.chord" and body.body.args[1]["id"] == "report"
    assert [b.tasks[0].args[1]["id"] for b in body.tasks] == [f"finetune@{a}" for a in ARCHS]
    # without a sweep the trunk is still ingest -> finetune -> chord(...)
    single = build_canvas(create_app("redis://127.0.0.1:1/0"), plan_of(edited(
        sweep=None, quantize={"variants": SETS["ptq"]}), plan_store), "run-2", "file:///store")
    assert [t.args[1]["id"] for t in single.tasks[:2]] == ["ingest", "finetune"]


# ------------------------------------------------------------------------------ a tiny run

RUN_SPEC = {
    "name": "sweep-run", "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "sweep": {"archs": ARCHS, "variant_sets": {"ptq": SETS["ptq"][1:] + [
        {"name": "ptq-minmax", "method": "static", "observer": "minmax"}], "dynamic": SETS["dynamic"]}},
    "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 3, "accuracy_budget": 0.05,
                  "runtimes": ["torchscript"]},
}
if "runtimes" in BenchmarkSpec.model_fields:  # TorchScript only: the other runtimes have their own tests
    RUN_SPEC["benchmark"]["runtimes"] = ["torchscript"]
NAMES = [f"{v}@{a}" for a in ARCHS for v in ("ptq-histogram", "ptq-minmax", "dynamic")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    store = FileStore(tmp_path_factory.mktemp("sweep-run"))
    return {"store": store, "summary": run_in_process(RUN_SPEC, store)}


def test_in_process_sweep_reports_the_whole_grid(run: dict) -> None:
    s, store = run["summary"], run["store"]
    assert s["status"] == "SUCCESS", s["failures"]
    assert list(s["baselines"]) == ARCHS and s["baseline"] == s["baselines"]["resnet18"]
    assert [v["name"] for v in s["variants"]] == NAMES
    for v in s["variants"]:
        own = s["baselines"][v["arch"]]["accuracy_top1"]
        assert v["accuracy_drop"] == pytest.approx(own - v["accuracy_top1"])
        assert v["set"] == ("dynamic" if v["variant"] == "dynamic" else "ptq")
    ok = [v for v in s["variants"] if v["accuracy_drop"] <= s["accuracy_budget"] + 1e-12]
    fastest = min(ok, key=lambda v: v["latency_ms_p50"]["1"])["name"] if ok else None
    assert s["selected"] == fastest, s["selection_reason"]
    assert "plot_errors" not in s and set(s["plots"]) >= {"accuracy_latency", "size", "training"}
    png = store.get_bytes(store.key_of(s["plots"]["accuracy_latency"]))
    assert png.startswith(b"\x89PNG")
    assert set(s["history"]) == {f"fp32@{a}" for a in ARCHS}
    # the CLI's table: one row per baseline and variant
    out = io.StringIO()
    print_summary(s, out=out)
    printed = out.getvalue()
    assert any(line.split()[:3] == ["variant", "arch", "set"] for line in printed.splitlines()), printed
    assert f"selected: {s['selected'] or 'none'}" in printed
    lines = text_table(s).splitlines()[2:]
    assert len(lines) == 2 + len(NAMES)
    for name in NAMES + [f"fp32@{a}" for a in ARCHS]:
        variant, arch = name.split("@")
        assert any(line.split()[:2] == [variant, arch] for line in lines), (name, lines)
    assert markdown(s, {}).count("| ptq-minmax |") == 2


def test_a_second_run_of_the_sweep_comes_from_the_cache(run: dict) -> None:
    again = run_in_process(RUN_SPEC, run["store"])
    spec = parse_spec(RUN_SPEC)
    assert again["cached_stages"] == len(build_plan(spec, prepare_sources(spec, run["store"]))) - 1  # all but report
    assert [v["accuracy_top1"] for v in again["variants"]] == [v["accuracy_top1"] for v in run["summary"]["variants"]]
