"""qat: a quantization-aware trained model served outside PyTorch. The fine-tuned ResNet18 of
``tests.helpers.TRAINED_SPEC`` (the ``finetuned`` fixture, trained once per test run) goes
through the real qat and benchmark stages (in process, on its file store) for one QAT epoch;
the qat stage writes its ONNX QDQ export next to the TorchScript file and the benchmark runs it
on ONNX Runtime, as it does a static variant's.

Tolerances are in steps of the int8 model's output quantization (its logits are int8 values
one step apart), the same as tests/test_runtimes.py allows a static model's file.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.quant import load_torchscript, quiet
from pipeline.stages import execute
from tests.helpers import TRAINED_SPEC, Finetuned, Trained, nodes_of

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = copy.deepcopy(TRAINED_SPEC) | {
    "quantize": {"variants": [{"name": "qat", "method": "qat", "epochs": 1, "lr": 0.001}]},
    "benchmark": {"batch_sizes": [1], "threads": 1, "warmup": 1, "iterations": 3,
                  "runtimes": ["torchscript", "onnxruntime"]},
}


def as_written(path: Path, images: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime with every optimization off: the file's own arithmetic."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return torch.from_numpy(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                            .run(None, {"input": images.numpy()})[0])


def test_a_qat_variant_is_exported_and_served_on_onnxruntime(finetuned: Finetuned, tmp_path: Path) -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    import onnx
    import onnxruntime as ort

    plan = nodes_of(SPEC, finetuned.store)
    assert plan["finetune"]["key"] == finetuned.plan["finetune"]["key"]  # the shared fine-tune, not another
    assert plan["qat:qat"]["config"]["export_onnx"] is True
    assert plan["benchmark:qat"]["config"]["runtimes"] == ["onnxruntime"]
    qat = execute(plan["qat:qat"], finetuned.store).manifest
    assert "export_errors" not in qat and set(qat["outputs"]) == {"model", "onnx"}, qat.get("export_errors")
    bench = execute(plan["benchmark:qat"], finetuned.store).manifest
    assert set(bench["runtimes"]) == {"torchscript", "onnxruntime"} and "skipped_runtimes" not in bench, bench

    # the file is the TorchScript int8 model: same logits as written, every layer int8 on ONNX Runtime
    run = Trained(finetuned, tmp_path)
    path = finetuned.store.fetch(qat["outputs"]["onnx"], tmp_path / "qat.onnx")
    scripted = load_torchscript(finetuned.store.fetch(qat["outputs"]["model"], tmp_path / "qat.ts"))
    with quiet(), torch.no_grad():
        fx = scripted(run.x_val)
    levels = torch.unique(fx)
    step = (levels[1:] - levels[:-1]).min().item()  # adjacent int8 logits: one output step
    diff = (as_written(path, run.x_val) - fx).abs() / step
    agree = (as_written(path, run.x_val).argmax(1) == fx.argmax(1)).float().mean().item()
    assert diff.max().item() <= 3 and diff.mean().item() <= 0.1 and agree >= 0.99, \
        f"max {diff.max().item():.2f} steps, mean {diff.mean().item():.3f}, top-1 agreement {agree:.4f}"

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") + ops.count("QGemm") == qat["int8_layers"], sorted(set(ops))
    served, torchscript = bench["runtimes"]["onnxruntime"], bench["runtimes"]["torchscript"]
    assert abs(served["accuracy_top1"] - torchscript["accuracy_top1"]) <= 0.03, (served, torchscript)
    assert served["latency_ms_p50"]["1"] > 0

