"""qpipe's static int8 model outside PyTorch: exported as an ONNX QDQ model, and run by
TorchScript, ONNX Runtime or OpenVINO behind one callable.

The export
    ``export_onnx_qdq`` writes the int8 model that ``pipeline.quant.convert_calibrated`` makes
    from the same calibrated (observed) model: float Conv/Gemm/Add/MaxPool/ReduceMean with a
    DequantizeLinear on every int8 weight (int8 initializers, per channel or per tensor as
    calibrated) and QuantizeLinear -> DequantizeLinear on every activation the FX model
    quantizes, with the same scales and zero points. Layers kept fp32 keep float weights.

    The route: ``_convert_to_reference_decomposed_fx``, with ``static_mapping(observed,
    keep_fp32)``, turns the observed graph into a float graph of ``quantized_decomposed``
    quantize/dequantize ops, the graph ``convert_fx`` would make int8.
    ``torch.onnx.export(dynamo=True)`` maps those ops to QuantizeLinear/DequantizeLinear
    (onnxscript's torchlib). Passes over the ONNX graph follow: the weights are folded to int8,
    the quantizers are placed where the runtimes' int8 kernels fuse them (``place_quantizers``,
    below) and layers kept fp32 are shielded. Four details make the file the FX model rather
    than an approximation of it:

    * the int8 weights are written as tensors (``_fold_weight_quantization``), computed by
      ``torch.quantize_per_channel`` / ``torch.quantize_per_tensor`` as ``convert_fx`` computes
      them. Left to the runtime, QuantizeLinear computes ``round(w / scale)`` where torch computes
      ``round(w * (1 / scale))``. The two differ on weights within one float rounding of a half
      step (9 of conv1's 9,408 in a test ResNet18), and an int8 network amplifies that layer by
      layer: mean |logit difference| from the FX model 0.44 output steps instead of 0.03;
    * activations saturate at 255. Under the asymmetric scheme (``pipeline.quant``), the x86
      engine's 7-bit activation range (``reduce_range``)
      only sets the scale; its kernels saturate at 255, as a uint8 QuantizeLinear does. The
      reference graph clamps at 127: on inputs three times the calibration range its logits
      are 15 output steps from the FX model's on average, the exported model's 0.05. torchlib
      drops that clamp, which is what the kernels do;
    * torchlib maps only the ``.default`` overloads of the per-tensor ops (Python scalars for
      scale and zero point). Per-tensor weights use the ``.tensor`` overloads, so
      ``_translations`` maps those too;
    * ONNX Runtime quantizes the float weight of any Conv/Gemm whose input comes from a
      per-tensor DequantizeLinear (its WeightBiasQuantization transformer; per-tensor int8).
      That would quantize every layer kept fp32, so ``_shield_float_layers`` gives each one an
      input requantized per channel with the same values.

    The graph FX gives has quantizers the runtimes do not fuse: ReLU6 shares its input's
    observer, so every conv + ReLU6 is written Q -> DQ -> Clip -> Q -> DQ with one scale, and
    an eval-mode Dropout or a Reshape leaves a requantization with the scale it had.
    ``place_quantizers`` rewrites these exactly (the integers each layer reads stay those of
    the FX model): the clamp runs on the integers between one Q and one DQ, with the zero point
    moved to the clamp's lower bound, and value-preserving ops run on the integers. OpenVINO's
    runner also folds each layer's activation (HardSwish, Sigmoid, SiLU, ...) into the layer
    (``openvino_model``), as NNCF places its quantizers for it; that drops one rounding and is
    not in the file, since ONNX Runtime would then run those layers in float.

    The input is named ``input``, with a dynamic batch dimension; the output is ``logits``; the
    opset is ``OPSET``. ``biases`` replaces layers' biases before the export: bias correction
    (``pipeline.quant.correct_bias``) changes the converted int8 model only, and
    ``int8_biases`` reads its biases back.

How closely it matches the FX int8 model
    Measured on ResNet18 trained for 2 epochs on the digits at 32x32, minmax, per-channel, on
    359 held-out images. The logits are int8 values one output step (``fc.scale``, 0.24) apart.
    ``tests/test_runtimes.py`` checks these figures:

    * run as written (ONNX Runtime with graph optimizations off: float ops between Q and DQ):
      at most 2 steps from the FX model, 0.025 step on average, top-1 the same on all images;
    * ONNX Runtime with every optimization (CPUExecutionProvider) fuses DQ -> Conv (-> Relu) ->
      Q into QLinearConv (20), the fc into QGemm and each residual Add into QLinearAdd (8), and
      runs uint8 x int8 throughout. QLinearConv takes its bias as int32 at scale x_scale *
      w_scale, and ONNX Runtime rounds every float bias to that grid, where the FX kernels add
      it in float. About 2 in 10,000 outputs of a layer land one step apart, and the steps
      multiply through the network: at most 3 steps from FX, 0.38 on average, top-1 the same on
      99.7 % (97.7-99.2 % for six observer, weight and kept-fp32 choices on a less accurate
      model, 0.88 top-1). The FX model is itself 0.50 step from fp32 on average;
    * OpenVINO (CPU plugin, reading the .onnx) turns the Q/DQ pairs into FakeQuantize and runs
      all 20 Convolutions and the FullyConnected layer in u8 (``runtimePrecision``): at most 3
      steps from FX, 0.50 on average, top-1 the same as ONNX Runtime's on 99.4 %. Its float
      parts run at the plugin's default precision (bf16 on CPUs with AMX, as here;
      ``OvRunner.precision``), layers kept fp32 included;
    * at 64x64 (2 epochs): top-1 the same as FX on 98.6 % (ONNX Runtime) and 99.2 % (OpenVINO)
      of the images; top-1 accuracy fp32 0.950, FX 0.953, ONNX Runtime and OpenVINO 0.950.

Latency
    ResNet18 int8, 10 classes, 64x64, one thread, p50 on a 2-vCPU Xeon with AVX-512 VNNI and
    AMX, a fresh runner per batch size: FX TorchScript 1.14 ms at batch 1 and 10.8 ms at batch
    32; ONNX Runtime 0.91 and 18.7 ms (its QLinearConv takes 18.5 of those 18.7 ms at batch
    32); OpenVINO 0.85 and 10.6 ms.

Runners
    ``load_runner(runtime, path, threads=..., batch_size=...)`` returns ``logits = runner(x)``
    on float NCHW torch tensors for each of ``RUNTIMES``; ``missing(runtime)`` says whether its
    package is installed (the ``runtimes`` extra). onnx, onnxscript, onnxruntime and openvino are
    imported only inside the functions that need them.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, StageError
from pipeline.quant import freeze_qat, load_torchscript, quantizable_layers, quiet, static_mapping

log = logging.getLogger(__name__)

RUNTIMES = ("torchscript", "onnxruntime", "openvino")
RUNTIME_PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # torchscript needs only torch
EXPORT_PACKAGES = ("onnx", "onnxscript")
INSTALL_HINT = "pip install 'qpipe[runtimes]'"
OPSET = 18  # the opset torchlib writes its quantized_decomposed functions against
INPUT_NAME, OUTPUT_NAME = "input", "logits"


# ------------------------------------------------------------------------------------ biases

def int8_biases(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The float bias of every int8 conv and linear layer of a converted static model
    (``convert_calibrated``, possibly bias-corrected), by layer name: what ``biases`` of
    ``export_onnx_qdq`` takes."""
    import torch.ao.nn.quantized as nnq

    return {name: m.bias().detach().clone() for name, m in qmodel.named_modules()
            if isinstance(m, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)) and m.bias() is not None}


def _set_biases(reference: nn.Module, biases: Mapping[str, torch.Tensor]) -> None:
    """Replace the biases of ``reference``'s layers named in ``biases`` (fp32 layer names; a
    fused conv + relu holds its conv at index 0)."""
    from torch.ao.nn.intrinsic import _FusedModule

    modules = dict(reference.named_modules())
    for name, bias in biases.items():
        layer = modules.get(name)
        if isinstance(layer, _FusedModule):
            layer = layer[0]
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            raise StageError(f"cannot set the bias of {name!r}: the model has no conv or linear layer of that "
                             "name (use the names int8_biases returns)")
        channels = layer.weight.shape[0]
        if tuple(bias.shape) != (channels,):
            raise StageError(f"the bias given for {name!r} has shape {tuple(bias.shape)}; the layer has "
                             f"{channels} output channels")
        layer.bias = nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)


# ------------------------------------------------------------------------------------ export

def _quantize_per_tensor_tensor(input, scale, zero_point, quant_min, quant_max, dtype):
    """``quantized_decomposed.quantize_per_tensor.tensor`` (scale and zero point as 1-element
    tensors) as a per-tensor QuantizeLinear; saturating to ``dtype``'s range, like the kernels."""
    from onnxscript import opset18 as op

    return op.QuantizeLinear(input, op.Squeeze(scale), op.Cast(op.Squeeze(zero_point), to=dtype))


def _dequantize_per_tensor_tensor(input, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
    """``quantized_decomposed.dequantize_per_tensor.tensor`` as a per-tensor DequantizeLinear
    (float32 out, the only output type qpipe's models use)."""
    from onnxscript import opset18 as op

    return op.DequantizeLinear(input, op.Squeeze(scale), op.Cast(op.Squeeze(zero_point), to=dtype))


def _translations() -> dict:
    """The exporter's translations for the ops torchlib does not map (see the module docstring)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the quantized_decomposed ops

    ops = torch.ops.quantized_decomposed
    return {ops.quantize_per_tensor.tensor: _quantize_per_tensor_tensor,
            ops.dequantize_per_tensor.tensor: _dequantize_per_tensor_tensor}


def _fold_weight_quantization(model: Any) -> int:
    """Replace every QuantizeLinear of a constant (a weight), and a Clip of constant bounds
    right after it, by the quantized tensor, computed with torch's own quantize functions (those
    ``convert_fx`` uses). ``model`` is an ``onnx.ModelProto``, changed in place; returns how many
    weights were folded. The float weights left unused are dropped."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    folded, replaced, new_constants = set(), {}, []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(i in constants for i in node.input[:3]):
            continue
        weight = torch.from_numpy(numpy_helper.to_array(constants[node.input[0]]).copy())
        scale = numpy_helper.to_array(constants[node.input[1]])
        zero_point = numpy_helper.to_array(constants[node.input[2]])
        dtype = {"int8": torch.qint8, "uint8": torch.quint8}[str(zero_point.dtype)]
        with quiet():
            if scale.ndim == 0:
                q = torch.quantize_per_tensor(weight, float(scale), int(zero_point), dtype)
            else:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                q = torch.quantize_per_channel(weight, torch.from_numpy(scale.astype("float64")),
                                               torch.from_numpy(zero_point.astype("int64")), axis, dtype)
        q = q.int_repr()
        folded.add(id(node))
        out = node.output[0]
        after = users.get(out, [])
        if len(after) == 1 and after[0].op_type == "Clip" and all(i in constants for i in after[0].input[1:3]):
            low, high = (int(numpy_helper.to_array(constants[i])) for i in after[0].input[1:3])
            q = q.clamp(low, high)
            folded.add(id(after[0]))
            out = after[0].output[0]
        name = f"{node.input[0]}_quantized"
        new_constants.append(numpy_helper.from_array(q.numpy(), name))
        replaced[out] = name
    kept = [n for n in graph.node if id(n) not in folded]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = replaced.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used] + new_constants
    del graph.initializer[:]
    graph.initializer.extend(live)
    return len(new_constants)


def _shield_float_layers(model: Any) -> int:
    """Keep the float Conv/Gemm nodes (layers kept fp32) float in ONNX Runtime, whose
    WeightBiasQuantization quantizes the float weight of a Conv/Gemm that reads a per-tensor
    DequantizeLinear (to per-tensor int8) but not of one that reads a per-channel one. Each
    such node reads its input through a QuantizeLinear -> DequantizeLinear pair of its own, per
    channel (axis 1) with the same scale and zero point for every channel: requantizing
    dequantized values with their own scale gives back exactly the same values.

    The pair reads the existing DequantizeLinear's output. Placed anywhere else it costs int8
    elsewhere: a second QuantizeLinear on the float tensor stops ONNX Runtime fusing the op
    that makes it (an Add into QLinearAdd), and a second DequantizeLinear on the existing
    QuantizeLinear stops OpenVINO running that tensor's other readers in int8. ``model`` is an
    ``onnx.ModelProto``, changed in place; returns how many layers were shielded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    nodes = []
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type in ("Conv", "Gemm") else None
        if (dq is not None and dq.op_type == "DequantizeLinear" and constants[dq.input[1]].ndim == 0
                and node.input[1] in constants):
            weight = constants[node.input[1]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Conv":
                channels = weight.shape[1] * attrs.get("group", 1)
            else:
                channels = weight.shape[1] if attrs.get("transB", 0) else weight.shape[0]
            prefix = f"{node.name or node.output[0]}_input"
            scale, zero_point, quantized, dequantized = (f"{prefix}_{part}" for part in
                                                         ("scale", "zero_point", "quantized", "dequantized"))
            graph.initializer.extend([numpy_helper.from_array(constants[dq.input[1]].repeat(channels), scale),
                                      numpy_helper.from_array(constants[dq.input[2]].repeat(channels), zero_point)])
            nodes += [helper.make_node("QuantizeLinear", [dq.output[0], scale, zero_point], [quantized],
                                       name=quantized, axis=1),
                      helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dequantized],
                                       name=dequantized, axis=1)]
            node.input[0] = dequantized
        nodes.append(node)
    shielded = len(nodes) - len(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return shielded // 2


# ------------------------------------------------------------------------ quantizer placement

# ops that move values without computing new ones: on the int8 tensor they give the int8 tensor
# of their float result, so a QuantizeLinear after them with the input's scale adds nothing
_VALUE_PRESERVING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Identity",
                               "Concat"})
# layers whose int32 accumulator the runtimes' int8 kernels pass through an activation before
# requantizing it (oneDNN post-ops in OpenVINO), and the activations they fuse that way
_ACCUMULATING = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu"})


class _QdqGraph:
    """An ONNX graph with what the placement rewrites read: each tensor's producer and readers,
    the constant initializers, and the quantization parameters of a QuantizeLinear or
    DequantizeLinear node. Rewrites change node inputs in place, add nodes and constants at
    the end, and ``prune`` drops what no graph output needs and puts the nodes back in
    topological order."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.readers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def read_only_by(self, name: str) -> list[Any]:
        """The nodes reading tensor ``name``; empty when it is a graph output (which must stay)."""
        return [] if name in self.outputs else self.readers.get(name, [])

    def qparams(self, node: Any) -> tuple | None:
        """(scale, zero point, axis) of a QuantizeLinear/DequantizeLinear as a comparable key,
        or None when they are not constants."""
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            return None
        scale, zero_point = (self.constants.get(name) for name in node.input[1:3])
        if scale is None or zero_point is None:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.ndim else None
        return scale.dtype.str, scale.tobytes(), zero_point.dtype.str, zero_point.tobytes(), axis

    def per_tensor(self, node: Any) -> tuple[float, int, Any] | None:
        """(scale, zero point, integer dtype) of a per-tensor Q/DQ node with constant parameters."""
        if self.qparams(node) is None or self.constants[node.input[1]].ndim:
            return None
        zero_point = self.constants[node.input[2]]
        return float(self.constants[node.input[1]]), int(zero_point), zero_point.dtype

    def fresh(self, name: str) -> str:
        """``name``, or ``name`` with underscores added, so that no tensor of the graph has it."""
        while name in self.constants or name in self.producer or name in self.readers:
            name += "_"
        return name

    def constant(self, name: str, value: Any) -> str:
        """Add ``value`` as an initializer named after ``name``; returns its name."""
        from onnx import numpy_helper

        name = self.fresh(name)
        self.constants[name] = value
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def replace_uses(self, old: str, new: str) -> None:
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def prune(self) -> None:
        """Drop the nodes and initializers no graph output depends on; nodes in topological
        order, otherwise in the order they had (Kahn's algorithm, lowest index first)."""
        import heapq

        producer = {o: n for n in self.graph.node for o in n.output}
        live: set[int] = set()
        stack = [producer[o] for o in self.outputs if o in producer]
        while stack:
            node = stack.pop()
            if id(node) not in live:
                live.add(id(node))
                stack.extend(producer[i] for i in node.input if i in producer)
        kept = [n for n in self.graph.node if id(n) in live]
        index = {o: k for k, n in enumerate(kept) for o in n.output}
        waiting = {k: {index[i] for i in n.input if i in index} for k, n in enumerate(kept)}
        unblocks: dict[int, list[int]] = {}
        for k, deps in waiting.items():
            for d in deps:
                unblocks.setdefault(d, []).append(k)
        ready = [k for k, deps in waiting.items() if not deps]
        heapq.heapify(ready)
        ordered = []
        while ready:
            k = heapq.heappop(ready)
            ordered.append(kept[k])
            for j in unblocks.get(k, []):
                waiting[j].discard(k)
                if not waiting[j]:
                    heapq.heappush(ready, j)
        used = {i for n in ordered for i in n.input}
        initializers = [t for t in self.graph.initializer if t.name in used or t.name in self.outputs]
        nodes = [copy.deepcopy(n) for n in ordered]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(initializers)
        self.constants = {k: v for k, v in self.constants.items() if k in used}
        self.refresh()


def _merge_duplicate_quantizers(g: _QdqGraph) -> int:
    """One QuantizeLinear (and one DequantizeLinear) per tensor and parameters: later copies are
    replaced by the first, so every reader of a tensor shares one quantizer."""
    first: dict[tuple, Any] = {}
    merged = 0
    for node in g.graph.node:  # topological: a merged Q makes its DQs duplicates by the time they come
        key = g.qparams(node)
        if key is None or node.output[0] in g.outputs:
            continue
        key = (node.op_type, node.input[0], key)
        if key in first:
            g.replace_uses(node.output[0], first[key].output[0])
            merged += 1
        else:
            first[key] = node
    g.prune()
    return merged


def _drop_requantization(g: _QdqGraph) -> int:
    """QuantizeLinear(DequantizeLinear(q)) with the same parameters is q: its readers read q."""
    dropped = 0
    for node in g.graph.node:
        before = g.producer.get(node.input[0])
        if (node.op_type == "QuantizeLinear" and before is not None and before.op_type == "DequantizeLinear"
                and g.qparams(node) is not None and g.qparams(node) == g.qparams(before)
                and node.output[0] not in g.outputs):
            g.replace_uses(node.output[0], before.input[0])
            dropped += 1
    g.prune()
    return dropped


def _quantized_passthrough(g: _QdqGraph) -> int:
    """DequantizeLinear -> value-preserving op -> QuantizeLinear -> DequantizeLinear, all with
    one per-tensor scale and zero point (a Concat's inputs all with it), becomes the op on the
    int8 tensor followed by one DequantizeLinear: exact, and the form ONNX Runtime's int8
    MaxPool/Reshape/Concat and OpenVINO's precision propagation run without a requantization."""
    moved = 0
    for node in list(g.graph.node):
        if node.op_type not in _VALUE_PRESERVING or len([o for o in node.output if o]) != 1:
            continue
        data = range(len(node.input)) if node.op_type == "Concat" else [0]
        before = [g.producer.get(node.input[i]) for i in data]
        if any(b is None or g.per_tensor(b) is None for b in before) or before[0].op_type != "DequantizeLinear":
            continue
        key = g.qparams(before[0])
        if any(b.op_type != "DequantizeLinear" or g.qparams(b) != key for b in before):
            continue
        requantized = g.read_only_by(node.output[0])
        after = [r for q in requantized for r in g.read_only_by(q.output[0])]
        if (not requantized or any(q.op_type != "QuantizeLinear" or g.qparams(q) != key for q in requantized)
                or any(q.output[0] in g.outputs for q in requantized)
                or any(r.op_type != "DequantizeLinear" or g.qparams(r) != key for r in after)):
            continue
        for i, b in zip(data, before, strict=True):
            node.input[i] = b.input[0]
        node.output[0] = g.fresh(f"{node.output[0]}_quantized")
        for r in after:
            r.input[0] = node.output[0]
        g.refresh()
        moved += 1
    g.prune()
    return moved


def _clamp_in_int8(g: _QdqGraph) -> int:
    """A Relu or Clip between two quantizations with the same scale and zero point, the form
    FX gives ReLU6 (its output shares its input's observer):
    ``Q(s, z) -> DQ -> Clip(lo, hi) -> Q(s, z) -> DQ`` becomes ``Q(s, z') -> [Clip(a, b)] -> DQ(s, z')``
    on the integers. Exact: a QuantizeLinear is monotonic, so clamping before it equals
    clamping its integers to [Q(lo), Q(hi)]. The zero point then moves down by what the clamp
    cuts off below (z' = 0 for ReLU/ReLU6 on uint8: the int8 kernels that read the tensor need no
    zero-point compensation), with the integer bounds moved with it; the Clip is dropped when
    the bounds are the type's whole range. One QuantizeLinear instead of two, no float op
    between a layer and its consumer: ONNX Runtime runs it as QLinearConv and a uint8 Clip,
    OpenVINO as one convolution with the clamp as a post-op."""
    import numpy as np

    folded = 0
    for first in list(g.graph.node):
        params = g.per_tensor(first) if first.op_type == "QuantizeLinear" else None
        dq = g.read_only_by(first.output[0])
        if (params is None or len(dq) != 1 or dq[0].op_type != "DequantizeLinear"
                or g.qparams(dq[0]) != g.qparams(first)):
            continue
        dq = dq[0]
        act = g.read_only_by(dq.output[0])
        if len(act) != 1 or act[0].op_type not in ("Relu", "Clip") or act[0].input[0] != dq.output[0]:
            continue
        act = act[0]
        bounds = [act.input[k] if len(act.input) > k else "" for k in (1, 2)] if act.op_type == "Clip" else ["", ""]
        if any(b and b not in g.constants for b in bounds):
            continue
        second = g.read_only_by(act.output[0])
        after = [r for q in second for r in g.read_only_by(q.output[0])]
        if (not second or any(q.op_type != "QuantizeLinear" or g.qparams(q) != g.qparams(first) for q in second)
                or any(q.output[0] in g.outputs for q in second)
                or any(r.op_type != "DequantizeLinear" or g.qparams(r) != g.qparams(first) or r.output[0] in g.outputs
                       for r in after)):
            continue
        _, zero_point, dtype = params
        qmin, qmax = (int(v) for v in (np.iinfo(dtype).min, np.iinfo(dtype).max))
        low = _quantize_bound(g.constants[bounds[0]] if bounds[0] else (0.0 if act.op_type == "Relu" else None),
                              params, qmin)
        high = _quantize_bound(g.constants[bounds[1]] if bounds[1] else None, params, qmax)
        shift = min(low, zero_point) - qmin
        if shift:
            moved = g.constant(f"{first.output[0]}_zero_point", np.array(zero_point - shift, dtype=dtype))
            first.input[2] = dq.input[2] = moved
        clamped = first.output[0]
        if (low - shift, high - shift) != (qmin, qmax):
            clamped = g.fresh(f"{first.output[0]}_clamped")
            g.graph.node.append(_make_node("Clip", [first.output[0],
                                                    g.constant(f"{clamped}_low", np.array(low - shift, dtype=dtype)),
                                                    g.constant(f"{clamped}_high", np.array(high - shift, dtype=dtype))],
                                           clamped))
        dq.input[0] = clamped
        for r in after:
            g.replace_uses(r.output[0], dq.output[0])
        g.refresh()
        folded += 1
    g.prune()
    return folded


def _quantize_bound(value: Any, params: tuple[float, int, Any], default: int) -> int:
    """QuantizeLinear of a float clamp bound (None: ``default``) as the runtime computes it:
    float32 division, rounding half to even, saturation to the integer type."""
    import numpy as np

    if value is None:
        return default
    scale, zero_point, dtype = params
    info = np.iinfo(dtype)
    return int(np.clip(np.round(np.float32(value) / np.float32(scale)) + zero_point, info.min, info.max))


def _fold_activations(g: _QdqGraph) -> int:
    """Drop the requantization between a conv/linear layer and the activation it feeds
    (HardSwish, HardSigmoid, Sigmoid, x * Sigmoid(x), LeakyRelu, a Relu/Clip left over), when the
    activation's result is quantized again: ``layer -> Q -> DQ -> act -> Q`` becomes
    ``layer -> act -> Q``, which OpenVINO runs as one int8 convolution with the activation and
    the requantization as post-ops (NNCF places its quantizers so). Not exact: one rounding of
    the layer's output fewer than the FX model, so the result is nearer the float model. ONNX
    Runtime has no int8 kernel for that form and would run the layer in float: only the
    OpenVINO runner applies this (``openvino_model``)."""
    folded = 0
    for layer in list(g.graph.node):
        if layer.op_type not in _ACCUMULATING:
            continue
        first = g.read_only_by(layer.output[0])
        if len(first) != 1 or first[0].op_type != "QuantizeLinear" or g.per_tensor(first[0]) is None:
            continue
        dq = g.read_only_by(first[0].output[0])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
            continue
        x = dq[0].output[0]
        readers = g.read_only_by(x)
        kinds = sorted(r.op_type for r in readers)
        if len(readers) == 1 and kinds[0] in _FUSED_ACTIVATIONS and readers[0].input[0] == x:
            result = readers[0].output[0]
        elif kinds == ["Mul", "Sigmoid"]:  # SiLU as the exporter writes it: x * Sigmoid(x)
            sigmoid, mul = sorted(readers, key=lambda r: r.op_type != "Sigmoid")
            if g.read_only_by(sigmoid.output[0]) != [mul] or sorted(mul.input) != sorted([x, sigmoid.output[0]]):
                continue
            result = mul.output[0]
        else:
            continue
        after = g.read_only_by(result)
        if not after or any(r.op_type != "QuantizeLinear" for r in after):
            continue
        for reader in readers:
            for i, name in enumerate(reader.input):
                if name == x:
                    reader.input[i] = layer.output[0]
        g.refresh()
        folded += 1
    g.prune()
    return folded


def _signed_as_int8(g: _QdqGraph) -> int:
    """A per-tensor uint8 activation quantizer with zero point 128 (the symmetric scheme's
    signed tensors, ``pipeline.quant``), read only by DequantizeLinear nodes of the same
    parameters, becomes int8 with zero point 0: the same integers minus 128, exact. OpenVINO
    takes a uint8 input with a zero point as asymmetric and compensates it in every convolution
    that reads it; as int8 it runs the kernels NNCF's symmetric models get. ONNX Runtime's
    x86 kernels prefer uint8, so only the OpenVINO runner applies this (``openvino_model``)."""
    import numpy as np

    changed, retyped = 0, set()
    zero = None
    for q in list(g.graph.node):
        params = g.per_tensor(q) if q.op_type == "QuantizeLinear" and q.input[0] not in g.constants else None
        if params is None or params[2] != np.uint8 or params[1] != 128 or q.output[0] in g.outputs:
            continue
        readers = g.read_only_by(q.output[0])
        if not readers or any(r.op_type != "DequantizeLinear" or g.qparams(r) != g.qparams(q) for r in readers):
            continue
        zero = zero or g.constant("int8_zero_point", np.array(0, dtype=np.int8))
        for node in (q, *readers):
            node.input[2] = zero
        retyped.add(q.output[0])
        changed += 1
    kept = [v for v in g.graph.value_info if v.name not in retyped]  # the exporter's uint8 type annotations
    del g.graph.value_info[:]
    g.graph.value_info.extend(kept)
    g.prune()
    return changed


def _make_node(op: str, inputs: list[str], output: str) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, [output], name=output)


def place_quantizers(model: Any, *, fold_activations: bool = False) -> dict[str, int]:
    """Rewrite an exported QDQ model (an ``onnx.ModelProto``, in place) so its quantizers sit
    where the runtimes' int8 kernels fuse them, and return how many places each rewrite changed.

    Always, all exact (the integers every layer reads are those of the graph as exported):
    duplicate quantizers of one tensor merged (``_merge_duplicate_quantizers``), a quantization
    of a tensor just dequantized with the same parameters removed (``_drop_requantization``;
    FX leaves one after an eval-mode Dropout), value-preserving ops moved onto the integers
    (``_quantized_passthrough``) and each ReLU/ReLU6 between two equal quantizations turned into
    one quantization and an integer clamp (``_clamp_in_int8``).

    ``fold_activations`` (OpenVINO's form) also removes the requantization between a layer and
    its activation (``_fold_activations``): what OpenVINO fuses, not exact, and slower on ONNX
    Runtime; and writes signed uint8 tensors with zero point 128 as int8 (``_signed_as_int8``, exact).

    A graph with subgraphs (If, Loop: tensors read from inside them are not tracked) is left as
    it is; qpipe's exports have none."""
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        return {}
    g = _QdqGraph(model)
    counts = {"merged": _merge_duplicate_quantizers(g), "requantizations": _drop_requantization(g),
              "passthrough": _quantized_passthrough(g), "int8_clamps": _clamp_in_int8(g)}
    if fold_activations:
        counts["folded_activations"] = _fold_activations(g)
        counts["signed_int8"] = _signed_as_int8(g)
    counts["requantizations"] += _drop_requantization(g)
    return counts


def _require(packages: Sequence[str], what: str) -> None:
    """Raise StageError, with the install hint, unless every one of ``packages`` imports."""
    absent = [p for p in packages if _importable(p) is not None]
    if absent:
        raise StageError(f"{what} needs {', '.join(absent)}, which cannot be imported: {INSTALL_HINT}")


def export_onnx_qdq(observed: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                    keep_fp32: Sequence[str] = (), biases: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the int8 model ``convert_calibrated(observed, keep_fp32)`` would make as one
    self-contained ONNX QDQ file at ``path`` (see the module docstring) and return ``path``.

    ``observed`` is a calibrated model (``pipeline.quant.calibrated``) or a quantization-aware
    trained one (``pipeline.quant.prepare_qat`` after training: the file is then the model
    ``convert_qat`` makes), ``example`` an input tuple of the model's shape (any batch size: the
    batch dimension is dynamic), ``keep_fp32`` the layers left in fp32 (static models only),
    ``biases`` {layer name: float bias} to use instead of those layers' own (``int8_biases`` of
    a bias-corrected model). Raises StageError when a layer name is unknown, a package is
    missing or the exporter fails."""
    from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx
    from torch.onnx.errors import OnnxExporterError

    unknown = sorted(set(keep_fp32) - set(quantizable_layers(observed)))
    if unknown:
        raise StageError(f"cannot keep {', '.join(unknown)} in fp32: no such quantizable layer")
    _require(EXPORT_PACKAGES, "exporting to ONNX")
    import onnx

    static = hasattr(observed, "qpipe_qconfig")  # set by calibrated(); a QAT model keeps its own mapping
    if keep_fp32 and not static:
        raise StageError("keep_fp32 applies to a calibrated static model only; a QAT model exports as trained")
    path = Path(path)
    mapping = static_mapping(observed, keep_fp32) if static else None
    model = copy.deepcopy(observed).cpu().eval()
    with quiet():
        reference = _convert_to_reference_decomposed_fx(model if static else freeze_qat(model), qconfig_mapping=mapping)
    _set_biases(reference, biases or {})
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(reference.eval(), example, str(path), dynamo=True, external_data=False, optimize=True,
                              opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              custom_translation_table=_translations(), verbose=False)
        model = onnx.load(str(path))
        weights = _fold_weight_quantization(model)
        placed = place_quantizers(model)
        shielded = _shield_float_layers(model)
        onnx.checker.check_model(model)
    except (OnnxExporterError, onnx.checker.ValidationError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StageError(f"exporting the int8 model to ONNX ({path.name}) failed: {type(err).__name__}: "
                         f"{first[:300]}. The FX int8 model itself is unaffected: deploy its TorchScript file, "
                         "or find the op the exporter cannot express: torch.onnx.export(..., report=True)") from None
    onnx.save(model, str(path))
    log.info("exported %s: %d int8 weights, %d float layer(s) shielded, quantizers placed: %s", path.name, weights,
             shielded, placed)
    return path


# ----------------------------------------------------------------------------------- runners

class OrtRunner:
    """An ONNX Runtime CPU session as ``logits = runner(x)`` on torch tensors: ``n_threads``
    intra-op threads, one inter-op, every graph optimization (QDQ fusion into int8 kernels)."""

    def __init__(self, path: Path, n_threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.contiguous().numpy()})[0])


def openvino_model(path: Path, core: Any = None) -> Any:
    """The ``openvino.Model`` qpipe's OpenVINO runner serves from the file at ``path``: an IR or
    a float ONNX file as OpenVINO reads it; an int8 QDQ ONNX file (``export_onnx_qdq``) with
    each layer's activation folded into the layer (``place_quantizers(fold_activations=True)``),
    the form OpenVINO's int8 kernels fuse into one convolution. ``openvino.save_model`` of the
    result writes that form as IR for a deployment. ``core``: an ``openvino.Core`` to read with."""
    import openvino as ov

    core = core or ov.Core()
    path = Path(path)
    if path.suffix != ".onnx":
        return core.read_model(str(path))
    source: str | bytes = str(path)
    if _importable("onnx") is None:
        import onnx

        model = onnx.load(str(path))
        if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            counts = place_quantizers(model, fold_activations=True)
            log.debug("%s for OpenVINO: %s", path.name, counts)
            source = model.SerializeToString()
    return _hard_sigmoid_as_hsigmoid(core.read_model(source))


def _hard_sigmoid_as_hsigmoid(model: Any) -> Any:
    """``model`` (an ``openvino.Model``, changed in place) with every HardSigmoid of alpha 1/6
    and beta 1/2 (torch's Hardsigmoid, as ONNX writes it) replaced by OpenVINO's HSigmoid, the
    same function. OpenVINO's ONNX reader keeps HardSigmoid, which its CPU plugin runs unfused
    in a reference kernel between two layout reorders (the squeeze-excitation gate of every
    mobilenet_v3 block); HSigmoid, what ``openvino.convert_model`` makes of the PyTorch module,
    fuses into the convolution before it. Measured with OpenVINO's per-layer counters on
    mobilenet_v3_large at 224x224, batch 1, one thread: the eight gates cost about 5 us each."""
    from openvino import opset5

    replaced = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "HardSigmoid":
            continue
        alpha, beta = (op.input_value(i).get_node() for i in (1, 2))
        if not all(c.get_type_name() == "Constant" for c in (alpha, beta)):
            continue
        a, b = (c.get_data().ravel() for c in (alpha, beta))
        if a.size != 1 or b.size != 1 or abs(float(a[0]) - 1 / 6) > 1e-6 or abs(float(b[0]) - 0.5) > 1e-6:
            continue
        hsigmoid = opset5.hsigmoid(op.input_value(0))
        hsigmoid.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(hsigmoid.output(0))
        replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return model


def save_openvino_ir(onnx_path: Path, xml_path: Path) -> tuple[Path, Path]:
    """Write the model qpipe's OpenVINO runner serves from the ONNX file ``onnx_path``
    (``openvino_model``: quantizers placed for OpenVINO, activations folded) as an OpenVINO IR,
    ``xml_path`` and the weights beside it (.bin), and return both paths. This is the file a
    deployment reads with a plain ``openvino.Core().compile_model``: read as it is, the ONNX file
    gives the unfolded graph, which ran mobilenet_v3_large and efficientnet_b0 about 1.24x
    slower at 224x224, batch 1 (``bench/placement.py``'s networks, one thread). The weights stay
    as stored (no fp16 compression). Raises StageError when openvino is missing."""
    _require(("openvino",), "writing an OpenVINO IR")
    import openvino as ov

    xml_path = Path(xml_path)
    ov.save_model(openvino_model(onnx_path), str(xml_path), compress_to_fp16=False)
    return xml_path, xml_path.with_suffix(".bin")


class OvRunner:
    """An OpenVINO model on the CPU plugin as ``logits = runner(x)``, compiled with a static
    shape per input shape (what a deployment with a fixed batch does): at construction for
    ``batch_size`` when given, otherwise at the first call of each shape. ``model`` is a file
    OpenVINO reads (.xml, .onnx: ``openvino_model``) or an ``openvino.Model``. ``compiled`` holds
    the compiled model of each shape; ``precision`` the plugin's inference precision for the
    float parts."""

    def __init__(self, model: Any, n_threads: int, batch_size: int | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = openvino_model(model, self.core) if isinstance(model, (str, Path)) else model
        self.config = {"INFERENCE_NUM_THREADS": n_threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled: dict[tuple[int, ...], Any] = {}
        self.requests: dict[tuple[int, ...], Any] = {}
        self.precision: str | None = None
        if batch_size is not None:
            rest = self.model.input(0).get_partial_shape()[1:]
            if not rest.is_static:
                raise StageError(f"cannot compile {model} for batch {batch_size}: its input shape is not static "
                                 f"beyond the batch ({self.model.input(0).get_partial_shape()})")
            self._request((batch_size, *rest.to_shape()))

    def _request(self, shape: tuple[int, ...]) -> Any:
        req = self.requests.get(shape)
        if req is None:
            m = self.model.clone()
            m.reshape(list(shape))
            compiled = self.compiled[shape] = self.core.compile_model(m, "CPU", self.config)
            self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16, f16
            req = self.requests[shape] = compiled.create_infer_request()
        return req

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        req = self._request(tuple(x.shape))
        req.infer({0: x.contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(req.get_output_tensor(0).data.copy())


def _importable(package: str) -> str | None:
    """None when ``package`` imports, else why not (one line)."""
    try:
        importlib.import_module(package)
    except ImportError as err:
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def missing(runtime: str) -> str | None:
    """None when ``runtime``'s Python package imports; otherwise one line saying what is missing
    and how to install it. torchscript needs only torch, so it is never missing."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    package = RUNTIME_PACKAGE.get(runtime)
    why = _importable(package) if package else None
    if why is None:
        return None
    return f"the {runtime} runtime needs the Python package {package!r} ({why}): {INSTALL_HINT}"


def load_runner(runtime: str, path: Path, *, threads: int,
                batch_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``logits = runner(x)`` (float NCHW torch tensor in, torch tensor out) running
    the model file at ``path`` with ``runtime`` (one of ``RUNTIMES``):

    * ``torchscript``: ``pipeline.quant.load_torchscript`` of a .ts file; its threads are torch's,
      so ``threads`` is left to the caller (``pipeline.bench.threads``);
    * ``onnxruntime``: an ``OrtRunner`` on the .onnx file with ``threads`` intra-op threads; the
      batch dimension stays dynamic;
    * ``openvino``: an ``OvRunner`` reading the .onnx (or IR) directly, with ``threads``
      inference threads, compiled now for a static ``batch_size`` when given.

    Raises ConfigError for an unknown runtime and StageError when its package is missing."""
    why = missing(runtime)
    if why:
        raise StageError(why)
    if runtime == "torchscript":
        return load_torchscript(Path(path))
    if runtime == "onnxruntime":
        return OrtRunner(Path(path), threads)
    return OvRunner(Path(path), threads, batch_size)


def export_onnx_fp32(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Write the float model ``model`` (the fine-tuned fp32 baseline) as one self-contained ONNX
    file at ``path`` and return ``path``: the same input and output names, dynamic batch
    dimension and opset as ``export_onnx_qdq``'s files, so the same runners serve it and the
    baseline is timed on ONNX Runtime and OpenVINO like the int8 forms. Raises StageError when a
    package is missing or the exporter fails."""
    from torch.onnx.errors import OnnxExporterError

    _require(EXPORT_PACKAGES, "exporting to ONNX")
    import onnx

    path = Path(path)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(copy.deepcopy(model).eval(), example, str(path), dynamo=True, external_data=False,
                              optimize=True, opset_version=OPSET, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              verbose=False)
        onnx.checker.check_model(str(path))
    except (OnnxExporterError, onnx.checker.ValidationError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StageError(f"exporting the fp32 model to ONNX ({path.name}) failed: {type(err).__name__}: "
                         f"{first[:300]}. Its TorchScript file is unaffected; find the op the exporter cannot "
                         "express: torch.onnx.export(..., report=True)") from None
    log.info("exported %s (fp32)", path.name)
    return path
