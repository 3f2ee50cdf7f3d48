"""Other engines' static int8 quantization, run inside qpipe so that their models enter the same
measurements and the same selection as qpipe's own: NNCF post-training quantization of the
OpenVINO model, and ONNX Runtime's static quantization to a QDQ ONNX model.

Both start from the same inputs as qpipe's static variants: the fine-tuned model and the
ingest's calibration images, normalised like every other input. Each writes a model file that
its runtimes read as it is:

* ``quantize_nncf``: ``nncf.quantize`` of the OpenVINO model ``openvino.convert_model`` makes of
  the PyTorch model (NNCF's documented route; read from the fp32 ONNX export instead, SiLU
  arrives as x * Sigmoid(x), and NNCF's model of efficientnet_b0 ran 1.2x slower at batch 1 and
  1.5x at batch 32 on OpenVINO), on every calibration image, with the variant's preset
  (performance: symmetric activations; mixed: asymmetric activations) and NNCF's fast bias
  correction or its full BiasCorrection algorithm;
  saved as OpenVINO IR (``model.xml`` + ``model.bin``: int8 weight constants, FakeQuantize on
  the activations), which OpenVINO runs;
* ``quantize_onnxruntime``: ``onnxruntime.quantization.quantize_static`` of the fp32 ONNX export
  (``pipeline.runtimes.export_onnx_fp32``) in QDQ format (uint8
  activations, int8 weights per channel or per tensor) calibrated by MinMax, Entropy or
  Percentile, after ONNX Runtime's ``quant_pre_process`` (shape inference and graph
  optimisation, which its documentation recommends) unless the variant turns it off; saved as
  ``model.onnx``, which ONNX Runtime runs, and OpenVINO too (it reads QDQ files).

Each returns an ``EngineModel``: its files, the format, what the engine was asked to do in the
engine's own terms and the versions that did it. ``graph_counts`` reads either file back and
counts its int8 and float conv/linear layers and its quantizers, so that a report can set the
engines' graphs side by side. nncf, openvino, onnx and onnxruntime are imported only inside the
functions that use them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENGINE_FORMATS = {"nncf": "openvino_ir", "onnxruntime": "onnx_qdq"}
# how a user loads each format (recorded in the benchmark manifest, like torch.jit.load for TorchScript)
LOAD_WITH = {"openvino_ir": "openvino.Core().read_model(model.xml)",
             "onnx_qdq": "onnxruntime.InferenceSession(model.onnx)"}
ORT_CALIBRATION_BATCH = 16  # images per calibration batch: only memory depends on it
_LAYER_OPS = {"onnx_qdq": ("Conv", "Gemm", "MatMul"), "openvino_ir": ("Convolution", "GroupConvolution", "MatMul")}


@dataclass(frozen=True)
class EngineModel:
    """An engine's int8 model: ``path`` is the file a runtime reads (an IR's .xml, an .onnx),
    ``weights`` the IR's .bin next to it (read with it), ``settings`` what the engine was asked
    to do."""

    path: Path
    format: str
    settings: dict[str, Any]
    weights: Path | None = None


def quantize_nncf(fp32: Any, example: Any, calib: np.ndarray, out_dir: Path, *, preset: str,
                  fast_bias_correction: bool) -> EngineModel:
    """NNCF post-training quantization of the fp32 PyTorch model ``fp32`` (converted by
    ``openvino.convert_model`` with ``example``, an input tensor, and a dynamic batch
    dimension), calibrated on every image of ``calib`` (float32, NCHW, normalised), one per batch
    as NNCF's examples feed it; written as IR to ``out_dir/model.xml`` and ``.bin``."""
    import nncf
    import openvino as ov

    model = ov.convert_model(fp32.cpu().eval(), example_input=example, input=[(-1, *example.shape[1:])])
    items = [calib[i:i + 1] for i in range(len(calib))]
    quantized = nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset(preset),
                              fast_bias_correction=fast_bias_correction, subset_size=len(items))
    xml = Path(out_dir) / "model.xml"
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    settings = {"api": "nncf.quantize", "input": "openvino.convert_model(fp32 PyTorch model)", "preset": preset,
                "bias_correction": "fast" if fast_bias_correction else "full", "subset_size": len(items),
                "versions": {"nncf": version("nncf"), "openvino": version("openvino")}}
    return EngineModel(xml, ENGINE_FORMATS["nncf"], settings, xml.with_suffix(".bin"))


def _batches(calib: np.ndarray, input_name: str) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(calib), ORT_CALIBRATION_BATCH):
        yield {input_name: calib[start:start + ORT_CALIBRATION_BATCH]}


def quantize_onnxruntime(fp32_onnx: Path, calib: np.ndarray, out_dir: Path, *, per_channel: bool,
                         calibrate_method: str, preprocess: bool) -> EngineModel:
    """ONNX Runtime static quantization of the fp32 ONNX model at ``fp32_onnx`` to a QDQ model
    at ``out_dir/model.onnx``: uint8 activations and int8 weights (the pairing ONNX Runtime's
    x86 int8 kernels take), calibrated on ``calib`` (float32, NCHW, normalised) by
    ``calibrate_method`` (minmax, entropy or percentile, ONNX Runtime's own defaults for each)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir = Path(out_dir)
    source = Path(fp32_onnx)
    if preprocess:
        source = out_dir / "fp32-preprocessed.onnx"
        quant_pre_process(str(fp32_onnx), str(source))
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _batches(calib, input_name)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    path = out_dir / "model.onnx"
    quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
    settings = {"api": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activations": "uint8",
                "weights": "int8", "per_channel": per_channel, "calibrate_method": calibrate_method,
                "pre_process": "quant_pre_process" if preprocess else "none", "calibration_images": len(calib),
                "versions": {"onnxruntime": version("onnxruntime")}}
    return EngineModel(path, ENGINE_FORMATS["onnxruntime"], settings)


def graph_counts(path: Path, fmt: str) -> dict[str, int]:
    """The conv/linear layers of the model file at ``path`` (format ``fmt``: onnx_qdq or
    openvino_ir) whose weight is int8 and those left float, and its activation quantizers:
    QuantizeLinear nodes of a QDQ file (its weights are int8 initializers read through
    DequantizeLinear), FakeQuantize ops of an IR (its weights are int8 constants)."""
    if fmt == "onnx_qdq":
        import onnx

        graph = onnx.load(str(path)).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        layers = [n for n in graph.node if n.op_type in _LAYER_OPS[fmt]]
        int8 = sum(1 for n in layers if len(n.input) > 1 and n.input[1] in dequantized)
        quantizers = sum(1 for n in graph.node if n.op_type == "QuantizeLinear")
        return {"int8_layers": int8, "fp32_layers": len(layers) - int8, "quantizers": quantizers}
    if fmt == "openvino_ir":
        import openvino as ov

        ops = ov.Core().read_model(str(path)).get_ops()
        layers = [op for op in ops if op.get_type_name() in _LAYER_OPS[fmt]]
        int8 = sum(1 for op in layers if _int8_weight(op.input_value(1).get_node()))
        quantizers = sum(1 for op in ops if op.get_type_name() == "FakeQuantize")
        return {"int8_layers": int8, "fp32_layers": len(layers) - int8, "quantizers": quantizers}
    raise ValueError(f"unknown engine model format {fmt!r}: use one of {', '.join(LOAD_WITH)}")


def _int8_weight(node: Any) -> bool:
    """Whether an IR weight input is int8: a chain Constant(i8/u8) -> Convert -> [Subtract] ->
    Multiply, or a FakeQuantize, within a few ops of the layer."""
    for _ in range(8):
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return node.get_output_element_type(0).get_type_name() in ("i8", "u8")
        if node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    return False
