"""bench/peak.py: the MAC counter on graphs whose MACs are known by hand, the peak graphs, the
rows it reads from a finished run's summary, and a smoke run of the bench itself on tiny sizes.
The speed figures are the bench's output, never judged here beyond being a sane fraction."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.peak import count_macs, from_summary, main, peak_graph, serve_summary
from pipeline.errors import CorruptArtifact
from pipeline.store import open_store

CONV_MACS = 16 * 5 * 5 * (8 // 2) * 3 * 3  # per image: C_out x H_out x W_out x (C_in / group) x kH x kW
GEMM_MACS = 10 * 400  # per image: N x K


def conv_gemm_model() -> onnx.ModelProto:
    """input (batch, 8, 10, 10) -> a grouped, strided Conv whose int8 weight goes through a
    DequantizeLinear (as qpipe's exports write it) -> Flatten -> Gemm with transB -> logits."""
    w = np.ones((16, 4, 3, 3), np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(16, 0.1, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(16, np.int8), "w_zero_point"),
             numpy_helper.from_array(np.ones((10, 400), np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["w"], axis=0),
             helper.make_node("Conv", ["input", "w"], ["c"], name="conv", group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 10, 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_count_macs_of_a_grouped_conv_and_a_gemm_per_batch() -> None:
    model = conv_gemm_model()
    one = count_macs(model)
    assert one["by_op"] == {"Conv": CONV_MACS, "Gemm": GEMM_MACS} and one["layers"] == 2
    assert one["total"] == CONV_MACS + GEMM_MACS
    assert count_macs(model, batch=3)["total"] == 3 * (CONV_MACS + GEMM_MACS)  # the dynamic batch is set
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # the model itself untouched


def test_count_macs_of_a_broadcast_matmul_and_a_refusal_for_unknown_shapes() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [7, 10, 4])
    b = numpy_helper.from_array(np.ones((4, 3), np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "g", [a],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 10, 3])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert count_macs(model)["total"] == 7 * 10 * 3 * 4  # broadcast batch x M x N x K

    model = conv_gemm_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"  # a spatial size not known
    with pytest.raises(ValueError, match="Conv node 'conv'.*static beyond the batch"):
        count_macs(model)


@pytest.mark.parametrize("int8", [True, False])
def test_the_peak_graphs_have_the_macs_of_their_layers(int8: bool) -> None:
    conv = peak_graph("conv", layers=3, width=16, extent=8, int8=int8)
    assert count_macs(conv)["total"] == 3 * (16 * 8 * 8) * 16 * 9
    matmul = peak_graph("matmul", layers=2, width=4, extent=5, int8=int8)  # (20, 32) x (32, 32)
    assert count_macs(matmul)["total"] == 2 * 20 * 32 * 32
    ops = {n.op_type for n in conv.graph.node}
    assert ("QuantizeLinear" in ops) is int8


def test_summary_rows_are_counted_in_their_own_or_their_baselines_onnx_file(tmp_path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    path = tmp_path / "model.onnx"
    onnx.save(conv_gemm_model(), str(path))
    onnx_ref = store.put_file("bench/fp32/model.onnx", path).to_dict()
    base = store.put_json("bench/fp32/manifest.json", {"metrics": {"threads": 2}, "outputs": {"onnx": onnx_ref}})
    dyn = store.put_json("bench/dynamic/manifest.json", {"metrics": {"threads": 2}, "outputs": {}})
    summary = {"run_id": "r1", "baseline": {"name": "fp32", "method": "fp32", "accuracy_top1": 0.9,
                                            "latency_ms_p50": {"1": 0.5}, "runtime": {"1": "openvino"},
                                            "runtimes": {"openvino": {"inference_precision": "bf16"}},
                                            "manifest": base.uri},
               "variants": [{"name": "dynamic", "method": "dynamic", "accuracy_top1": 0.9,
                             "latency_ms_p50": {"1": 0.25}, "manifest": dyn.uri},
                            {"name": "qat", "method": "qat", "accuracy_top1": None}]}  # failed: not served
    models, skipped = from_summary(summary, store, tmp_path)
    assert skipped == [] and [m["name"] for m in models] == ["fp32", "dynamic"]
    peaks = {"int8": {"2": {"gmacs": 1.0}}, "bf16": {"2": {"gmacs": 0.5}}}
    serve_summary(models, peaks)
    fp32, dynamic = (m["batches"]["1"] for m in models)
    macs = CONV_MACS + GEMM_MACS
    # the dynamic variant: counted in its baseline's file, with its own manifest's thread count
    assert models[1]["macs_per_image"] == macs and models[1]["threads"] == 2
    assert fp32["precision"] == "bf16" and fp32["runtime"] == "openvino"
    assert fp32["achieved_gmacs"] == round(macs / 0.5 / 1e6, 2)
    assert fp32["fraction_of_int8_peak"] == round(macs / 0.5 / 1e6, 4)
    assert fp32["fraction_of_precision_peak"] == round(macs / 0.5 / 1e6 / 0.5, 4)
    assert dynamic["runtime"] == "torchscript" and dynamic["achieved_gmacs"] == round(macs / 0.25 / 1e6, 2)

    (tmp_path / "store" / "bench" / "fp32" / "model.onnx").write_bytes(b"not the exported file")
    with pytest.raises(CorruptArtifact):  # a file that does not hash to its reference is never read
        from_summary(summary, store, tmp_path)


def test_the_bench_runs_on_tiny_sizes_and_reports_fractions_of_the_peak(capsys) -> None:
    assert main(["--archs", "resnet18", "--image-size", "16", "--batch-sizes", "1", "--peak-threads", "1",
                 "--peak-layers", "2", "--rounds", "1", "--seconds", "0.1", "--iterations", "5",
                 "--calib-batches", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["peak"]["int8"]) == {"1"} and report["peak"]["int8"]["1"]["gmacs"] > 0
    assert report["peak"]["fp32"]["1"]["gmacs"] > 0
    assert {(m["precision"], m["graph"], m["runtime"]) for m in report["peak_measurements"]} >= {
        ("int8", g, rt) for g in ("conv", "matmul") for rt in ("onnxruntime", "openvino")}
    assert [m["name"] for m in report["models"]] == ["resnet18-fp32", "resnet18-int8"]
    for m in report["models"]:
        assert m["macs_per_image"] > 0 and m["threads"] == 1
        b = m["batches"]["1"]
        assert b["runtime"] == min(b["p50_ms_by_runtime"], key=b["p50_ms_by_runtime"].get)
        assert b["achieved_gmacs"] == pytest.approx(m["macs_per_image"] / b["latency_ms_p50"] / 1e6, rel=1e-3)
        assert 0 < b["fraction_of_int8_peak"] <= 1.5, m
