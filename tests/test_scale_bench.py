"""bench/scale.py's arithmetic: the spans it reads off a run's stages, the critical path through
the plan, and the speedup, efficiency and projection it prints (the runs themselves are the
bench's, never the suite's)."""

from __future__ import annotations

import pytest

from bench.scale import compare, critical_path, quietest, spans


def node(node_id: str, *deps: str) -> dict:
    return {"id": node_id, "inputs": {d: {"id": d} for d in deps}}


# ingest -> finetune -> calibrate -> (sensitivity parts 0 and 1 -> quantize:a (their join) -> benchmark:a,
# quantize:b -> benchmark:b), finetune -> benchmark:fp32, everything -> report
PLAN = [node("ingest"), node("finetune", "ingest"), node("calibrate:minmax", "finetune"),
        node("sensitivity:a:0", "calibrate:minmax"), node("sensitivity:a:1", "calibrate:minmax"),
        node("quantize:a", "calibrate:minmax", "sensitivity:a:0", "sensitivity:a:1"),
        node("quantize:b", "calibrate:minmax"), node("benchmark:a", "quantize:a"), node("benchmark:b", "quantize:b"),
        node("benchmark:fp32", "finetune"), node("report", "benchmark:a", "benchmark:b", "benchmark:fp32")]


def row(node_id: str, started: float, finished: float, worker: str = "w1") -> dict:
    return {"id": node_id, "stage": node_id.split(":")[0], "started": started, "finished": finished, "worker": worker}


def one_worker_run() -> dict:
    times = [("ingest", 0, 2), ("finetune", 2, 10), ("calibrate:minmax", 10, 12), ("sensitivity:a:0", 12, 14),
             ("sensitivity:a:1", 14, 17), ("benchmark:fp32", 17, 20), ("quantize:a", 20, 21), ("quantize:b", 21, 25),
             ("benchmark:a", 25, 29), ("benchmark:b", 29, 32), ("report", 32, 34)]
    return {"run_id": "r", "stages": [row(i, a, b) for i, a, b in times]}


def test_spans_split_the_run_into_its_serial_part_and_its_fan_out() -> None:
    got = spans(one_worker_run(), PLAN, None)
    assert got["pipeline_span_s"] == 34 and got["fan_out_span_s"] == 22 and got["serial_span_s"] == 12
    assert got["fan_out_work_s"] == 22 and got["fan_out_stages"] == 8 and got["longest_fan_out_stage_s"] == 4
    # calibrate, the longer sensitivity part, their join quantize:a, benchmark:a (the b branch takes 9 s)
    assert got["critical_path_s"] == 2 + 3 + 1 + 4
    assert got["fan_out_seconds_by_stage"] == {"benchmark": 10, "calibrate": 2, "quantize": 5, "sensitivity": 5}
    only = spans(one_worker_run(), PLAN, {"quantize"})
    assert only["fan_out_span_s"] == 25 - 20 and only["critical_path_s"] == 4


def test_critical_path_ignores_nodes_outside_the_fan_out() -> None:
    assert critical_path(PLAN, {"quantize:a": 1.0, "benchmark:a": 5.0, "benchmark:fp32": 7.0}) == 7.0
    assert critical_path(PLAN, {}) == 0.0


def test_compare_gives_speedup_efficiency_and_the_projection() -> None:
    one = {"cpu_workers": 1, "pipeline_span_s": 28.0, "fan_out_span_s": 16.0, "serial_span_s": 12.0,
           "fan_out_work_s": 16.0, "critical_path_s": 9.0}
    two = {"cpu_workers": 2, "pipeline_span_s": 21.0, "fan_out_span_s": 9.0, "serial_span_s": 12.0,
           "fan_out_work_s": 17.0}
    got = compare([one, two])
    assert got["fan_out"] == {"speedup": round(16 / 9, 2), "efficiency": round(16 / 9 / 2, 2),
                              "work_growth": round(17 / 16, 2)}
    assert got["pipeline"] == {"speedup": round(28 / 21, 2), "efficiency": round(28 / 21 / 2, 2)}
    f = 12 / 28
    assert got["serial_fraction"] == pytest.approx(f, abs=1e-3)
    assert got["projection"]["4"]["amdahl_speedup"] == round(1 / (f + (1 - f) / 4), 2)
    # with 4 workers the fan-out's work over 4 (4 s) is under its critical path (9 s): the plan bounds it
    assert got["projection"]["4"]["bounded_by_plan"] == round(28 / (12 + 9), 2)
    assert got["projection"]["16"]["bounded_by_plan"] == got["projection"]["4"]["bounded_by_plan"]


def test_the_quietest_round_is_the_one_whose_busier_configuration_saw_the_least_load() -> None:
    rounds = [[{"other_load": 0.1}, {"other_load": 0.6}], [{"other_load": 0.3}, {"other_load": 0.2}],
              [{"other_load": None}, {"other_load": 0.4}]]
    assert quietest(rounds) == 1
