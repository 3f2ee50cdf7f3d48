"""pipeline/trust.py: a run whose answer cannot be trusted says so, in the summary, the report
and the CLI."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from pipeline.trust import chance_floor, warnings

pytestmark = pytest.mark.usefixtures("one_thread")


def summary(top1: float, *, classes: int = 10, val: int = 359, budget: float = 0.01, history=None) -> dict:
    return {"baseline": {"name": "fp32", "accuracy_top1": top1}, "accuracy_budget": budget,
            "data": {"classes": classes, "val": val}, "history": history or {}}


def test_a_baseline_near_chance_is_named_with_the_floor_it_missed() -> None:
    assert chance_floor(10, 359) == pytest.approx(0.2)  # chance again beats 3 standard errors there
    assert chance_floor(2, 20) == pytest.approx(0.5 + 3 * math.sqrt(0.25 / 20))
    [w] = warnings(summary(0.115))  # mobilenet_v3_large from scratch, 6 epochs at lr 0.01
    assert w["kind"] == "chance" and w["model"] == "fp32"
    assert "0.1150" in w["message"] and "10 classes" in w["message"] and "0.2000" in w["message"]
    assert warnings(summary(0.95)) == []
    sweep = summary(0.95) | {"baselines": {"resnet18": {"accuracy_top1": 0.95},
                                           "mobilenet_v3_large": {"accuracy_top1": 0.11}}}
    assert [w["model"] for w in warnings(sweep)] == ["fp32@mobilenet_v3_large"]


def test_a_validation_split_too_small_for_the_budget_is_named() -> None:
    [w] = warnings(summary(0.95, val=50, budget=0.01))  # one image: 0.02 > 0.01
    assert w["kind"] == "resolution" and "50 images" in w["message"] and "0.0200" in w["message"]
    assert warnings(summary(0.95, val=100, budget=0.01)) == []  # 0.01: exactly the budget is resolved


def test_a_loss_that_diverged_is_named() -> None:
    nan = [{"epoch": 1, "train_loss": 2.3}, {"epoch": 2, "train_loss": float("nan")}]
    up = [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}, {"epoch": 3, "train_loss": 4.1}]
    noise = [{"epoch": 1, "train_loss": 0.05}, {"epoch": 2, "train_loss": 0.09}]  # a short QAT wobbles
    found = warnings(summary(0.95, history={"fp32": nan, "qat": up, "fine": [{"epoch": 1, "train_loss": 1.0}],
                                            "qat2": noise}))
    assert [(w["kind"], w["model"]) for w in found] == [("diverged", "fp32"), ("diverged", "qat")]
    assert "nan at epoch 2" in found[0]["message"] and "0.9000 at epoch 1, 4.1000 at epoch 3" in found[1]["message"]


def test_a_run_that_learned_nothing_says_so_in_summary_report_and_cli(tmp_path: Path) -> None:
    from pipeline.runner import run_in_process
    from pipeline.store import FileStore
    from workers.cli import print_summary

    spec = {"name": "untrained", "seed": 0, "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 8},
            "model": {"arch": "resnet18"},
            # a learning rate that moves nothing: the fp32 model stays at its random start
            "finetune": {"epochs": 1, "batch_size": 64, "lr": 1e-9},
            "quantize": {"variants": [{"name": "dyn", "method": "dynamic"}]},
            "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 2, "runtimes": ["torchscript"],
                          "accuracy_budget": 0.001}}
    store = FileStore(tmp_path)
    result = run_in_process(spec, store)
    kinds = {w["kind"] for w in result["warnings"]}
    assert {"chance", "resolution"} <= kinds, result["warnings"]
    md = store.get_bytes(store.key_of(result["report"])).decode()
    assert "## Warnings: this answer may not be trusted" in md and "near chance for 10 classes" in md
    out = io.StringIO()
    print_summary(result, out=out)
    lines = out.getvalue().splitlines()
    assert lines[2].startswith("warning: fp32 reaches top-1"), lines[:4]
