"""Other engines inside the tournament: static variants quantized by NNCF and by ONNX Runtime
(``engine: nncf``, ``engine: onnxruntime``; ``pipeline.engines``) next to qpipe's own, each its
own quantize node, measured on the same validation images and runtimes, entered in the same
selection and named in the report.

One in-process run (``run_in_process``, 16x16 digits, one epoch, 16 calibration images) serves
the run tests; the plan tests need no run.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest

from pipeline.report import table
from pipeline.runner import run_in_process
from pipeline.stages import manifest_key
from pipeline.store import FileStore
from pipeline.summary import select
from tests.helpers import SMALL_SPEC, nodes_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_RUNTIMES = ["torchscript", "onnxruntime", "openvino"]
ENGINE_VARIANTS = [
    {"name": "nncf-mixed", "method": "static", "engine": "nncf", "preset": "mixed", "fast_bias_correction": False},
    {"name": "ort-entropy", "method": "static", "engine": "onnxruntime", "calibrate_method": "entropy"},
]
RUN_SPEC = {
    "name": "engines",
    "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 16},
    "model": {"arch": "resnet18"},
    "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.01},
    "quantize": {"variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"}, *ENGINE_VARIANTS]},
    # a budget every model meets, so that the selection is the fastest of all of them
    "benchmark": {"batch_sizes": [1, 4], "threads": 1, "warmup": 1, "iterations": 3, "accuracy_budget": 1.0,
                  "runtimes": ALL_RUNTIMES},
}
ENGINES = {"nncf-mixed": ("nncf", {"openvino"}), "ort-entropy": ("onnxruntime", {"onnxruntime", "openvino"})}


# ----------------------------------------------------------------------------------- plans

def with_engines(*variants: dict) -> dict:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["quantize"]["variants"] += copy.deepcopy(list(variants))
    spec["benchmark"]["runtimes"] = ALL_RUNTIMES
    return spec


def test_engine_nodes_are_parallel_cpu_branches(plan_store: FileStore) -> None:
    """Each engine variant is a quantize node of its own on the cpu queue that reads only the
    dataset and the fine-tuned model, so the engines run in parallel with each other and with
    qpipe's branches; its benchmark measures it on its runtimes alone; and adding engine
    variants moves no other node's key."""
    base = nodes_of(with_engines(), plan_store)
    nodes = nodes_of(with_engines(*ENGINE_VARIANTS), plan_store)
    for name, (engine, runtimes) in ENGINES.items():
        q, b = nodes[f"quantize:{name}"], nodes[f"benchmark:{name}"]
        assert (q["stage"], q["queue"], set(q["inputs"])) == ("quantize", "cpu", {"data", "model"})
        assert (q["inputs"]["data"]["id"], q["inputs"]["model"]["id"]) == ("ingest", "finetune")
        assert q["config"]["engine"] == engine and q["config"]["observer"] is None
        assert (b["queue"], b["config"]["engine"], set(b["config"]["runtimes"])) == ("cpu", engine, runtimes)
        assert b["inputs"]["model"]["id"] == q["id"]
    assert nodes["quantize:nncf-mixed"]["config"].items() >= {"preset": "mixed",
                                                              "fast_bias_correction": False}.items()
    assert nodes["quantize:ort-entropy"]["config"].items() >= {"calibrate_method": "entropy",
                                                               "preprocess": True}.items()
    assert {i: n["key"] for i, n in nodes.items() if i in base and i != "report"} == \
        {i: n["key"] for i, n in base.items() if i != "report"}
    entries = {e["name"]: e for e in nodes["report"]["config"]["variants"]}
    assert entries["nncf-mixed"]["engine"] == "nncf" and "engine" not in entries["ptq-minmax"]


def test_engine_options_enter_the_key(plan_store: FileStore) -> None:
    """Options that change the engine's model change its node's key, and its benchmark's."""
    first = nodes_of(with_engines(*ENGINE_VARIANTS), plan_store)
    changed = copy.deepcopy(ENGINE_VARIANTS)
    changed[0]["preset"], changed[1]["per_channel"] = "performance", False
    second = nodes_of(with_engines(*changed), plan_store)
    for name in ENGINES:
        for stage in ("quantize", "benchmark"):
            assert first[f"{stage}:{name}"]["key"] != second[f"{stage}:{name}"]["key"], (stage, name)
    assert first["quantize:ptq-minmax"]["key"] == second["quantize:ptq-minmax"]["key"]


# ------------------------------------------------------------------------------------ a run

@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, FileStore, dict[str, dict]]:
    store = FileStore(tmp_path_factory.mktemp("engines-store"))
    summary = run_in_process(RUN_SPEC, store)
    nodes = nodes_of(RUN_SPEC, store)
    manifests = {i: store.get_json(manifest_key(n["stage"], n["key"])) for i, n in nodes.items()
                 if n["stage"] != "report"}
    return summary, store, manifests


def test_engine_rows_are_measured_and_selected(run: tuple) -> None:
    """Each engine's row has top-1 and latency at every batch size on each runtime its model
    runs on (and no TorchScript form), is served by one of them, and is a candidate of the
    selection like qpipe's own variant."""
    summary, _, manifests = run
    assert summary["status"] == "SUCCESS", summary["failures"]
    rows = {v["name"]: v for v in summary["variants"]}
    for name, (engine, runtimes) in ENGINES.items():
        row = rows[name]
        assert row["engine"] == engine and set(row["runtimes"]) == runtimes
        for rt, m in row["runtimes"].items():
            assert 0.0 <= m["accuracy_top1"] <= 1.0, rt
            assert set(m["latency_ms_p50"]) == {"1", "4"} and all(v > 0 for v in m["latency_ms_p50"].values())
        assert set(row["runtime"].values()) <= runtimes
        for batch, rt in row["runtime"].items():  # the row's figures are those of the form serving it
            assert row["latency_ms_p50"][batch] == row["runtimes"][rt]["latency_ms_p50"][batch]
            assert row["accuracy_top1_served"][batch] == row["runtimes"][rt]["accuracy_top1"]
        assert select([row], 1.0, "1")[0] == name  # a candidate on its own
        bench = manifests[f"benchmark:{name}"]
        assert "torchscript" not in bench["runtimes"] and bench["engine"] == engine
        assert bench["produced_by"]["key"] == manifests[f"quantize:{name}"]["key"]
    assert rows["ptq-minmax"].get("engine") is None and "torchscript" in rows["ptq-minmax"]["runtimes"]
    # every model is within the budget, so the selection is the fastest of all three at batch 1
    assert f"among {len(rows)} variant(s)" in summary["selection_reason"]
    assert summary["selected"] == min(rows.values(), key=lambda v: v["latency_ms_p50"]["1"])["name"]


def test_report_names_the_engine(run: tuple) -> None:
    """The table has an engine column (qpipe for its own variants), and the report says what each
    engine was asked to do, in the written report.md too."""
    summary, store, _ = run
    header, *rows = table(summary)
    column = header.index("engine")
    assert header[column - 1] == "method"
    assert {r[0]: r[column] for r in rows} == {"fp32": "-", "ptq-minmax": "qpipe", "nncf-mixed": "nncf",
                                              "ort-entropy": "onnxruntime"}
    written = store.get_bytes(f"runs/{summary['run_id']}/report.md").decode()
    for text in ("| nncf-mixed | static | nncf |", "| ort-entropy | static | onnxruntime |",
                 "nncf-mixed: engine nncf, nncf.quantize (", "preset mixed", "bias_correction full",
                 "ort-entropy: engine onnxruntime, onnxruntime.quantization.quantize_static (",
                 "calibrate_method entropy", "pre_process quant_pre_process"):
        assert text in written, text


def test_engine_models_are_the_engines_int8_files(run: tuple, tmp_path: Path) -> None:
    """The stored models are what the engines make, read back from the files: ONNX Runtime's a
    QDQ graph whose every Conv reads int8 weights and uint8 activations through
    DequantizeLinear; NNCF's an IR with FakeQuantize on the activations and int8 weights."""
    import onnx
    import openvino as ov
    from onnx import TensorProto

    _, store, manifests = run
    ort = manifests["benchmark:ort-entropy"]
    assert ort["format"] == "onnx_qdq"
    graph = onnx.load(str(store.fetch(ort["outputs"]["model"], tmp_path / "ort.onnx"))).graph
    ops = Counter(n.op_type for n in graph.node)
    produced = {o: n for n in graph.node for o in n.output}
    constants = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and len(convs) == 20  # ResNet18's convs
    for conv in convs:
        x, w = produced[conv.input[0]], produced[conv.input[1]]
        assert x.op_type == w.op_type == "DequantizeLinear", conv.name
        assert constants[w.input[0]].data_type == TensorProto.INT8
        assert constants[x.input[2]].data_type == TensorProto.UINT8
    assert ort["quantizers"] == ops["QuantizeLinear"] and ort["int8_layers"] == 21  # 20 convs and the fc

    nncf = manifests["benchmark:nncf-mixed"]
    assert nncf["format"] == "openvino_ir" and set(nncf["outputs"]) == {"model", "weights"}
    xml = store.fetch(nncf["outputs"]["model"], tmp_path / "nncf.xml")
    store.fetch(nncf["outputs"]["weights"], tmp_path / "nncf.bin")  # digests checked on the way
    model_ops = ov.Core().read_model(str(xml)).get_ops()
    kinds = Counter(op.get_type_name() for op in model_ops)
    int8_constants = [op for op in model_ops if op.get_type_name() == "Constant"
                      and op.get_output_element_type(0) == ov.Type.i8]
    assert kinds["FakeQuantize"] > 0 and kinds["Convolution"] == 20
    assert len(int8_constants) >= kinds["Convolution"] + kinds["MatMul"]
    assert nncf["quantizers"] == kinds["FakeQuantize"] and nncf["int8_layers"] == 21
    assert nncf["engine_settings"].items() >= {"preset": "mixed", "bias_correction": "full", "subset_size": 16,
                                               "input": "openvino.convert_model(fp32 PyTorch model)"}.items()
    assert ort["engine_settings"].items() >= {"calibrate_method": "entropy", "per_channel": True}.items()


def test_an_engine_row_outside_the_budget_keeps_its_own_runtime(run: tuple) -> None:
    """A row without a TorchScript form is never said to be served by TorchScript: with no form
    within the budget (or no baseline) it keeps its reference runtime, whose figures it holds."""
    from pipeline.summary import choose_runtimes, entry

    _, _, manifests = run
    for name, (_, runtimes) in ENGINES.items():
        bench = manifests[f"benchmark:{name}"]
        row = entry(bench)
        assert row["reference_runtime"] in runtimes
        choose_runtimes(row, None, 0.0)
        assert set(row["runtime"].values()) == {bench["reference_runtime"]}
        assert row["latency_ms_p50"] == bench["runtimes"][bench["reference_runtime"]]["latency_ms_p50"]
