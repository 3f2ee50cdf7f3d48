"""Per-layer sensitivity and the accuracy-budget fallback (``fallback: auto``).

The model is the calibration tests' ResNet18 fine-tuned on digits at 32x32 (the ``finetuned``
fixture, trained once per test run), with one outlier activation channel planted between
``layer3.1.conv1`` and ``layer3.1.conv2`` (the fp32 function is unchanged; minmax calibration
then crushes every other channel of that activation). It is handed to the pipeline as a
checkpoint and "fine-tuned" with a frozen backbone at a negligible learning rate, so the stages
see exactly that model. The whole plan runs in process on a file store; the distributed fan-out
of the parts is covered by tests/test_scale.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import SpecError
from pipeline.runner import run_in_process
from pipeline.sensitivity import rank, rank_by_latency, search_fallback
from pipeline.spec import parse_spec
from pipeline.stages import execute
from tests.helpers import OUTLIER_BLOCK, TRAINED_SPEC, Finetuned, Trained, nodes_of, with_outlier

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = 3
BUDGET = 0.01
OUTLIER_LAYERS = {f"{OUTLIER_BLOCK}.conv1", f"{OUTLIER_BLOCK}.conv2"}


def outlier_spec(checkpoint: str) -> dict:
    return {
        "name": "sensitivity-test",
        "seed": 0,
        "data": TRAINED_SPEC["data"],
        "model": {"arch": "resnet18", "weights": checkpoint},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 1e-9, "freeze_backbone": True},
        "quantize": {"sensitivity_parts": PARTS, "variants": [
            {"name": "minmax", "method": "static", "observer": "minmax", "sensitivity": True},
            {"name": "minmax-fallback", "method": "static", "observer": "minmax", "fallback": "auto"},
        ]},
        "benchmark": {"batch_sizes": [1, 8], "warmup": 1, "iterations": 5, "accuracy_budget": BUDGET},
    }


class Outcome:
    def __init__(self, run: Trained) -> None:
        path = run.folder / "outlier.pt"
        torch.save(with_outlier(run.model, run.calib, run.x_val).state_dict(), path)
        self.spec = parse_spec(outlier_spec(str(path)))
        self.store = run.store
        self.plan = nodes_of(self.spec, run.store)
        self.summary = run_in_process(self.spec, run.store)
        self.variants = {v["name"]: v for v in self.summary["variants"]}

    def manifest(self, node_id: str) -> dict:
        return execute(self.plan[node_id], self.store).manifest  # cached: the stored manifest


@pytest.fixture(scope="module")
def outcome(finetuned: Finetuned, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return Outcome(Trained(finetuned, tmp_path_factory.mktemp("sensitivity")))


def test_plan_splits_the_layers_into_parts_shared_by_variants_that_convert_alike(outcome: Outcome) -> None:
    plan = outcome.plan
    for v in ("minmax", "minmax-fallback"):
        parts = [plan[f"sensitivity:{v}:{i}"] for i in range(PARTS)]
        assert [p["config"]["part"] for p in parts] == list(range(PARTS))
        q = plan[f"quantize:{v}"]
        assert {k: d["id"] for k, d in q["inputs"].items() if k.startswith("sensitivity_")} == \
            {f"sensitivity_{i}": f"sensitivity:{v}:{i}" for i in range(PARTS)}
    assert [plan[f"sensitivity:minmax:{i}"]["key"] for i in range(PARTS)] == \
        [plan[f"sensitivity:minmax-fallback:{i}"]["key"] for i in range(PARTS)]
    assert plan["quantize:minmax-fallback"]["config"]["accuracy_budget"] == BUDGET
    assert "fallback" not in plan["quantize:minmax"]["config"]


def test_parts_cover_every_layer_once_and_rank_the_outlier_pair_first(outcome: Outcome) -> None:
    parts = [outcome.manifest(f"sensitivity:minmax:{i}") for i in range(PARTS)]
    layers = [r["layer"] for p in parts for r in p["layers"]]
    assert len(layers) == len(set(layers)) == 21, layers
    assert {p["fp32_accuracy"] for p in parts} == {parts[0]["fp32_accuracy"]}
    ranking = outcome.manifest("quantize:minmax")["sensitivity"]["ranking"]
    assert [r["rank"] for r in ranking] == list(range(1, 22))
    table = "\n".join(f"{r['rank']:>2} {r['layer']:<24} drop {r['drop_top1']:+.4f} sqnr {r['sqnr_db']} dB "
                      f"recovered {r['recovered_top1']:+.4f}" for r in ranking)
    assert {r["layer"] for r in ranking[:2]} == OUTLIER_LAYERS, table
    assert ranking[0]["drop_top1"] > 0.02, table
    assert all(r["drop_top1"] <= ranking[1]["drop_top1"] for r in ranking[2:]), table
    # the rest of the model is robust alone: SQNR well above the outlier pair's
    assert min(r["sqnr_db"] or 1e9 for r in ranking[2:]) > max(r["sqnr_db"] for r in ranking[:2]), table


def test_fallback_keeps_the_fewest_sensitive_layers_that_meet_the_budget(outcome: Outcome) -> None:
    base = outcome.summary["baseline"]["accuracy_top1"]
    plain, fb_row = outcome.variants["minmax"], outcome.variants["minmax-fallback"]
    assert base - plain["accuracy_top1"] > BUDGET, "all-int8 minmax should miss the budget on this model"
    q = outcome.manifest("quantize:minmax-fallback")
    fb = q["fallback"]
    tried = ", ".join(f"{t['kept']} kept: drop {t['drop']:+.4f}" for t in fb["tried"])
    assert fb["met"] is True, f"{fb['message']} ({tried})"
    assert OUTLIER_LAYERS <= set(fb["kept_fp32"]) and len(fb["kept_fp32"]) <= 3, tried
    assert [t["kept"] for t in fb["tried"]] == list(range(len(fb["kept_fp32"]) + 1))
    assert all(t["drop"] > BUDGET for t in fb["tried"][:-1]), tried  # fewer layers did not do
    assert {r["layer"] for r in q["layers"] if r["precision"] == "fp32"} == set(fb["kept_fp32"])
    # measured again by the benchmark, on the deployed TorchScript: within the budget too
    assert base - fb_row["accuracy_top1"] <= BUDGET + 1e-9, (base, fb_row["accuracy_top1"])
    bench = outcome.manifest("benchmark:minmax-fallback")["fallback"]
    assert set(bench["latency_cost_ms"]) == {"1", "8"}
    assert all(bench["latency_ms_p50_all_int8"][b] > 0 for b in ("1", "8"))
    assert outcome.summary["selected"] == "minmax-fallback", outcome.summary["selection_reason"]


def test_search_reports_the_best_mix_when_none_meets_the_budget() -> None:
    rows = [{"layer": f"l{i}", "index": i, "drop_top1": 0.1 / (i + 1), "sqnr_db": 10.0 + i,
             "all_but_top1": 0.5, "all_but_sqnr_db": 20.0} for i in range(4)]
    ranking = rank(rows, int8_accuracy=0.5)
    assert [r["layer"] for r in ranking] == ["l0", "l1", "l2", "l3"]
    scores = {0: 0.50, 1: 0.70, 2: 0.80, 3: 0.80, 4: 0.75}  # the best is 2 layers, never within 0.01 of 0.9
    fb = search_fallback(ranking, lambda kept: scores[len(kept)], fp32_accuracy=0.9, budget=0.01)
    assert fb["met"] is False
    assert fb["kept_fp32"] == ["l0", "l1"] and fb["accuracy_top1"] == 0.80
    assert "no mix meets the budget" in fb["message"] and "0.1000" in fb["message"]
    assert len(fb["tried"]) == 5
    met = search_fallback(ranking, lambda kept: scores[len(kept)] + 0.1, fp32_accuracy=0.9, budget=0.01)
    assert met["met"] is True and met["kept_fp32"] == ["l0", "l1"] and len(met["tried"]) == 3


def test_sensitivity_options_are_refused_where_they_do_not_apply() -> None:
    base = {"name": "s", "quantize": {"variants": []}}
    for variant, word in (({"name": "d", "method": "dynamic", "fallback": "auto"}, "fallback"),
                          ({"name": "q", "method": "qat", "sensitivity": True}, "sensitivity")):
        with pytest.raises(SpecError) as err:
            parse_spec(base | {"quantize": {"variants": [variant]}})
        assert f"{word} only applies to method: static" in str(err.value)
    spec = parse_spec(base | {"quantize": {"variants": [{"name": "f", "method": "static", "fallback": "auto"}]}})
    assert spec.quantize.variants[0].sensitivity is True


def test_report_ranks_the_layers_and_shows_what_the_fallback_kept(outcome: Outcome) -> None:
    summary = outcome.summary
    assert "sensitivity" in summary["plots"] and not summary.get("plot_errors")
    png = outcome.store.get_bytes(outcome.store.key_of(summary["plots"]["sensitivity"]))
    assert png.startswith(b"\x89PNG")
    kept = outcome.variants["minmax-fallback"]["fallback"]["kept_fp32"]
    md = outcome.store.get_bytes(outcome.store.key_of(summary["report"])).decode()
    assert "## Accuracy-budget fallback" in md and "![Layer sensitivity](sensitivity.png)" in md
    assert f"Kept in fp32: {', '.join(kept)}." in md
    assert "## Layer sensitivity: minmax, minmax-fallback" in md  # one analysis, shared
    first = outcome.variants["minmax"]["sensitivity"]["ranking"][0]["layer"]
    assert f"| 1 | {first} |" in md
    page = outcome.store.get_bytes(outcome.store.key_of(summary["report_html"])).decode()
    assert "<h2>Accuracy-budget fallback</h2>" in page and f"<td>{first}</td>" in page


def test_each_static_variant_runs_on_every_runtime_or_says_why_not(outcome: Outcome) -> None:
    """The default runtimes: TorchScript, and the ONNX QDQ export on ONNX Runtime and OpenVINO
    (the ``runtimes`` extra; where it is missing, each is skipped with the reason)."""
    budget = outcome.summary["accuracy_budget"]
    base = outcome.summary["baseline"]["accuracy_top1"]
    for v in outcome.variants.values():
        forms, skipped = v["runtimes"], v.get("skipped_runtimes", {})
        assert set(forms) | set(skipped) == {"torchscript", "onnxruntime", "openvino"} and "torchscript" in forms
        assert all("pip install 'qpipe[runtimes]'" in why for why in skipped.values()), skipped
        for rt, m in forms.items():  # the same int8 model: top-1 within 2 points of the TorchScript form
            assert abs(m["accuracy_top1"] - forms["torchscript"]["accuracy_top1"]) <= 0.02, (v["name"], rt, m)
        for b, rt in v["runtime"].items():  # served by the fastest form within the budget, else TorchScript
            usable = {r: m for r, m in forms.items() if base - m["accuracy_top1"] <= budget + 1e-12}
            assert rt == min(usable, key=lambda r: usable[r]["latency_ms_p50"][b], default="torchscript"), \
                (v["name"], b, usable)
            assert v["latency_ms_p50"][b] == forms[rt]["latency_ms_p50"][b]
    chosen = outcome.summary["selection_per_batch"]
    assert chosen["1"]["variant"] == outcome.summary["selected"] == "minmax-fallback"
    for b, pick in chosen.items():
        assert pick["runtime"] == outcome.variants[pick["variant"]]["runtime"][b]
    if "onnxruntime" in outcome.variants["minmax-fallback"]["runtimes"]:
        md = outcome.store.get_bytes(outcome.store.key_of(outcome.summary["report"])).decode()
        assert "## Runtimes" in md and "| minmax-fallback | onnxruntime |" in md


# ------------------------------------------------------------------ fallback: latency

def test_latency_ranking_takes_the_layer_that_buys_most_per_millisecond_first() -> None:
    rows = [{"layer": "big", "index": 0, "drop_top1": 0.04, "sqnr_db": 5.0, "all_but_top1": 0.90, "cost_ms": 0.40},
            {"layer": "cheap", "index": 1, "drop_top1": 0.03, "sqnr_db": 6.0, "all_but_top1": 0.89, "cost_ms": 0.02},
            {"layer": "free", "index": 2, "drop_top1": 0.01, "sqnr_db": 9.0, "all_but_top1": 0.87, "cost_ms": -0.01},
            {"layer": "inert", "index": 3, "drop_top1": 0.0, "sqnr_db": 30.0, "all_but_top1": 0.86, "cost_ms": 0.0}]
    by_drop = rank([{k: v for k, v in r.items()} for r in rows], int8_accuracy=0.86)
    assert [r["layer"] for r in by_drop] == ["big", "cheap", "free", "inert"]
    by_cost = rank_by_latency(by_drop)
    # free: 0.01 per the 0.01 ms floor = 1.0/ms; cheap: 0.03 / 0.02 = 1.5/ms; big: 0.04 / 0.4 = 0.1/ms;
    # inert buys nothing back and stays last, whatever it costs
    assert [r["layer"] for r in by_cost] == ["cheap", "free", "big", "inert"]
    assert [r["latency_rank"] for r in by_cost] == [1, 2, 3, 4]
    assert by_cost[0]["recovered_per_ms"] == pytest.approx(1.5) and by_cost[0]["rank"] == 2
    fb = search_fallback(by_cost, lambda kept: 0.86 + 0.03 * ("cheap" in kept) + 0.01 * ("free" in kept),
                         fp32_accuracy=0.90, budget=0.01, order="latency")
    assert fb["met"] and fb["kept_fp32"] == ["cheap"] and fb["order"] == "latency"


@pytest.fixture(scope="module")
def latency_outcome(outcome: Outcome) -> dict:
    """The same model and calibration (cached) with one variant that falls back by latency."""
    spec = outlier_spec(outcome.spec.model.weights)
    spec["quantize"]["variants"] = [{"name": "minmax-latency", "method": "static", "observer": "minmax",
                                     "fallback": "latency"}]
    parsed = parse_spec(spec)
    plan = nodes_of(parsed, outcome.store)
    summary = run_in_process(parsed, outcome.store)
    return {"summary": summary, "quantize": execute(plan["quantize:minmax-latency"], outcome.store).manifest,
            "parts": [execute(plan[f"sensitivity:minmax-latency:{i}"], outcome.store).manifest for i in range(PARTS)]}


def test_latency_fallback_times_each_layer_and_keeps_layers_by_top1_per_millisecond(latency_outcome: dict) -> None:
    parts = latency_outcome["parts"]
    rows = [r for p in parts for r in p["layers"]]
    assert rows and all(isinstance(r["cost_ms"], float) for r in rows), rows[:2]
    sens = latency_outcome["quantize"]["sensitivity"]
    by_cost = sens["latency_ranking"]
    assert sorted(r["layer"] for r in by_cost) == sorted(r["layer"] for r in sens["ranking"])
    gaining = [r for r in by_cost if r["benefit_top1"] > 0]
    assert [r["recovered_per_ms"] for r in gaining] == sorted((r["recovered_per_ms"] for r in gaining), reverse=True)
    fb = latency_outcome["quantize"]["fallback"]
    tried = ", ".join(f"{t['kept']} kept: drop {t['drop']:+.4f}" for t in fb["tried"])
    assert fb["order"] == "latency" and fb["met"] is True, f"{fb['message']} ({tried})"
    assert fb["kept_fp32"] == [r["layer"] for r in by_cost[:len(fb["kept_fp32"])]]  # taken in that order
    assert OUTLIER_LAYERS & set(fb["kept_fp32"]), tried  # what repairs the planted outlier is among them
    assert latency_outcome["summary"]["variants"][0]["fallback"]["order"] == "latency"


def test_report_shows_both_rankings_for_a_latency_fallback(latency_outcome: dict, outcome: Outcome) -> None:
    summary = latency_outcome["summary"]
    md = outcome.store.get_bytes(outcome.store.key_of(summary["report"])).decode()
    assert "## Layer sensitivity: minmax-latency" in md and "## Layer cost-benefit: minmax-latency" in md
    assert "layers taken by top-1 recovered per ms" in md
