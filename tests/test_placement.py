"""Where the ONNX export puts its quantizers (``pipeline.runtimes.place_quantizers``) and the
form OpenVINO's runner serves (``openvino_model``).

The models have random weights, at 16x16 and a quarter of their width so each export takes
seconds; their batch norms' statistics are first set on random images, so every activation
has a range, and they are calibrated with minmax on random images. What is checked does not
depend on the weights: the graph's structure, and that the rewrites keep the integers every
layer reads (the file run as written gives the very same logits as the export without them).

Every test skips without onnx, onnxscript, onnxruntime (and openvino where it is used).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.placement import settle_batch_norms
from pipeline import runtimes
from pipeline.quant import calibrated, observer_state, prepare_static

SIZE = 16
SEED = 0


@pytest.fixture(autouse=True)
def _packages(one_thread) -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)


def calibrate(model: nn.Module, arch: str) -> nn.Module:
    """``model`` (random weights) calibrated with minmax, after its batch norms' running
    statistics are set on random images (``settle_batch_norms``)."""
    gen = torch.Generator().manual_seed(SEED)
    settle_batch_norms(model, SIZE, gen)
    example = (torch.zeros(1, 3, SIZE, SIZE),)
    observing = prepare_static(model, example, observer="minmax", per_channel=True, backend="x86", arch=arch)
    with torch.no_grad():
        observing(torch.randn(32, 3, SIZE, SIZE, generator=gen))
    return calibrated(model, example, observer_state(observing), observer="minmax", per_channel=True,
                      backend="x86", arch=arch)


def torchvision_model(arch: str, **kwargs) -> nn.Module:
    import torchvision

    torch.manual_seed(SEED)
    return torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def mbv2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MobileNetV2 (quarter width, random weights) calibrated with minmax under the default
    scheme and exported once for the module: the model, the observed graph, the placed file and
    the graph as FX wrote it (saved before the placement's rewrites)."""
    import onnx

    model = torchvision_model("mobilenet_v2", width_mult=0.25)
    observed = calibrate(model, "mobilenet_v2")
    tmp = tmp_path_factory.mktemp("mbv2")
    placing, as_fx_wrote_it = runtimes.place_quantizers, tmp / "unplaced.onnx"

    def keep_a_copy(model, **kwargs):
        onnx.save(model, str(as_fx_wrote_it))
        return placing(model, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtimes, "place_quantizers", keep_a_copy)
        path = runtimes.export_onnx_qdq(observed, (torch.zeros(1, 3, SIZE, SIZE),), tmp / "placed.onnx")
    return {"model": model, "observed": observed, "path": path, "as_fx_wrote_it": as_fx_wrote_it}


def silu_se_block() -> nn.Module:
    """EfficientNet's pattern, small: conv + BN + SiLU, a squeeze-excitation block (SiLU inside,
    Sigmoid gate), a projection conv, pooling and a classifier."""
    from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

    torch.manual_seed(SEED)
    return nn.Sequential(Conv2dNormActivation(3, 16, stride=2, activation_layer=nn.SiLU),
                         Conv2dNormActivation(16, 32, activation_layer=nn.SiLU),
                         SqueezeExcitation(32, 8, activation=nn.SiLU),
                         Conv2dNormActivation(32, 16, activation_layer=None),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class Graph:
    """An ONNX file's nodes with each tensor's producer and readers."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        self.model = onnx.load(str(path))
        self.nodes = list(self.model.graph.node)
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.readers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.ops = Counter(n.op_type for n in self.nodes)

    def made_by(self, name: str) -> str | None:
        node = self.producer.get(name)
        return node.op_type if node is not None else None

    def requantized_layer_output(self, name: str) -> bool:
        """Whether tensor ``name`` is a conv or linear layer's output quantized and dequantized."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or self.made_by(dq.input[0]) != "QuantizeLinear":
            return False
        return self.made_by(self.producer[dq.input[0]].input[0]) in ("Conv", "Gemm")

    def qparams(self, node) -> tuple:
        return tuple(self.constants[i].tobytes() for i in node.input[1:3])


def run_as_written(path: Path, images: torch.Tensor) -> torch.Tensor:
    """The graph as written (ONNX Runtime, every optimization off): the file's own arithmetic."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": images.numpy()})[0])


def test_mobilenet_v2_export_has_one_quantizer_per_quantized_tensor(mbv2: dict) -> None:
    """The FX int8 MobileNetV2 quantizes the input, every conv's output (ReLU6 included), every
    residual add's output, the pooled features and the logits: one QuantizeLinear each, and no
    more. The graph as FX writes it has one more per ReLU6 (a Q -> DQ -> Clip -> Q chain with one
    scale) and two after the pooling (the flatten's, and an eval-mode Dropout's own observer in
    FX), with the parameters the pooled features already had: 102 at full width. Each ReLU6's range is [0, at
    most 6] (its observer records the clamped values), so its clamp is the integer type's own
    and no Clip is left. Placement keeps every integer: the file's logits, run as written, are
    those of the graph FX wrote, on inputs well outside the calibrated range too."""
    relu6 = sum(isinstance(m, nn.ReLU6) for m in mbv2["model"].modules())
    path, as_fx_wrote_it = mbv2["path"], mbv2["as_fx_wrote_it"]
    g = Graph(path)

    quantized_tensors = 1 + g.ops["Conv"] + g.ops["Gemm"] + g.ops["Add"] + g.ops["ReduceMean"]
    assert (relu6, g.ops["Conv"]) == (35, 52), g.ops
    assert g.ops["QuantizeLinear"] == quantized_tensors, g.ops
    quantized = [n.input[0] for n in g.nodes if n.op_type == "QuantizeLinear"]
    assert len(set(quantized)) == len(quantized), "a tensor with two QuantizeLinear"
    for n in g.nodes:
        if n.op_type == "QuantizeLinear" and g.made_by(n.input[0]) == "DequantizeLinear":
            assert g.qparams(n) != g.qparams(g.producer[n.input[0]]), f"{n.name} requantizes with equal parameters"
        if n.op_type == "Conv":  # one quantizer on each conv's output, nothing float in between
            assert [r.op_type for r in g.readers[n.output[0]]] == ["QuantizeLinear"], n.name
        if n.op_type in ("Clip", "Relu"):  # ReLU6 clamps the integers: no Q -> DQ -> Clip -> Q chain
            assert g.made_by(n.input[0]) == "QuantizeLinear", f"{n.name} reads {g.made_by(n.input[0])}"
            assert int(g.constants[g.producer[n.input[0]].input[2]]) == 0, f"{n.name}: zero point not at its floor"
    assert g.ops["Clip"] == 0, g.ops

    before = Graph(as_fx_wrote_it)
    assert before.ops["QuantizeLinear"] == quantized_tensors + relu6 + 2, before.ops  # + the flatten's and Dropout's
    images = 3 * torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED + 1))
    assert torch.equal(run_as_written(path, images), run_as_written(as_fx_wrote_it, images))


def activation_observers(observed: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.quantization.observer import ObserverBase

    return {name: m for name, m in observed.named_modules() if isinstance(m, ObserverBase)
            and "activation_post_process" in name and hasattr(m, "min_val") and m.min_val.numel() == 1}


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_relu6_ranges_start_at_zero_and_signed_tensors_are_symmetric(scheme: str, mbv2: dict) -> None:
    """The observer a ReLU6 shares with the conv before it records the clamped values: its range
    is [0, at most 6] with zero point 0 under both schemes (FX's shared observer would otherwise
    take the conv's signed output, half the levels spent on what the ReLU6 removes). Under the
    symmetric scheme every signed tensor gets zero point 128 on the full 8 bits, the middle of
    the range; under the asymmetric one, torch's x86 default: any zero point, 7 bits."""
    model = mbv2["model"]
    observed = mbv2["observed"] if scheme == "symmetric" else with_scheme(model, mbv2["observed"], scheme)
    observers = activation_observers(observed)
    after_relu6 = {k: m for k, m in observers.items() if type(m).__name__.startswith("AfterRelu6")}
    assert len({id(m) for m in after_relu6.values()}) == sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
    for name, m in after_relu6.items():
        scale, zero_point = m.calculate_qparams()
        assert 0.0 <= float(m.min_val) and float(m.max_val) <= 6.0, name
        assert int(zero_point) == 0 and m.quant_max == (255 if scheme == "symmetric" else 127), name
    signed = {k: m for k, m in observers.items() if float(m.min_val) < 0}
    assert len(signed) >= 10  # the input, the projections, the residual sums
    for name, m in signed.items():
        scale, zero_point = m.calculate_qparams()
        if scheme == "symmetric":
            bound = max(-float(m.min_val), float(m.max_val))
            assert int(zero_point) == 128 and float(scale) == pytest.approx(2 * bound / 255, rel=1e-5), name
        else:
            assert m.quant_max == 127 and int(zero_point) != 128, name


def test_qat_trains_with_the_same_ranges_and_is_served_as_int8_without_zero_points(tmp_path: Path) -> None:
    """A QAT model gets the symmetric scheme too: after a few training steps its ReLU6
    fake-quantizers' ranges start at zero (the observer inside records the clamped values) and
    its signed tensors sit at zero point 128; exported, the OpenVINO form reads every activation
    with zero point 0."""
    import onnx
    from torch.ao.quantization.fake_quantize import FakeQuantize

    from pipeline.quant import prepare_qat

    model = torchvision_model("mobilenet_v2", width_mult=0.25)
    gen = torch.Generator().manual_seed(SEED)
    prepared = prepare_qat(model, (torch.zeros(1, 3, SIZE, SIZE),), backend="x86", arch="mobilenet_v2")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        loss = nn.functional.cross_entropy(prepared(torch.randn(16, 3, SIZE, SIZE, generator=gen)),
                                           torch.randint(0, 10, (16,), generator=gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fake_quants = {n: m for n, m in prepared.named_modules() if type(m) is FakeQuantize}
    after_relu6 = {n: m for n, m in fake_quants.items()
                   if type(m.activation_post_process).__name__.startswith("AfterRelu6")}
    assert len({id(m) for m in after_relu6.values()}) == 35
    for name, m in after_relu6.items():
        assert float(m.activation_post_process.min_val) >= 0.0 and int(m.zero_point) == 0, name
    signed = [m for m in fake_quants.values() if float(m.activation_post_process.min_val) < 0]
    assert signed and all(int(m.zero_point) == 128 for m in signed)

    path = runtimes.export_onnx_qdq(prepared.eval(), (torch.zeros(1, 3, SIZE, SIZE),), tmp_path / "qat.onnx")
    form = onnx.load(str(path))
    counts = runtimes.place_quantizers(form, fold_activations=True)
    onnx.save(form, str(tmp_path / "openvino.onnx"))
    f = Graph(tmp_path / "openvino.onnx")
    zero_points = [f.constants[n.input[2]] for n in f.nodes if n.op_type == "QuantizeLinear"
                   and n.input[0] not in f.constants]
    assert counts["signed_int8"] == len(signed) and all(int(z) == 0 for z in zero_points), counts  # one each


def with_scheme(model: nn.Module, observed: nn.Module, activations: str) -> nn.Module:
    """``observed``'s calibration under another activation scheme (the same statistics)."""
    example = (torch.zeros(1, 3, SIZE, SIZE),)
    return calibrated(model, example, observer_state(observed), observer="minmax", per_channel=True,
                      backend="x86", arch="mobilenet_v2", activations=activations)


def test_openvino_form_reads_signed_tensors_as_int8_with_the_same_integers(mbv2: dict, tmp_path: Path) -> None:
    """The symmetric scheme's signed tensors (uint8, zero point 128) become int8 with zero point
    0 in the model OpenVINO's runner serves, so no convolution there reads a zero point; the
    rewrite is exact: run as written, the logits are the file's, bit for bit."""
    import onnx

    path = mbv2["path"]
    form = onnx.load(str(path))
    counts = runtimes.place_quantizers(form, fold_activations=True)
    onnx.save(form, str(tmp_path / "openvino.onnx"))
    f, g = Graph(tmp_path / "openvino.onnx"), Graph(path)
    assert counts["folded_activations"] == 0 and counts["signed_int8"] >= g.ops["Add"] + 1, counts
    activation_q = [n for n in f.nodes if n.op_type == "QuantizeLinear" and n.input[0] not in f.constants]
    assert len(activation_q) == g.ops["QuantizeLinear"]
    zero_points = [f.constants[n.input[2]] for n in activation_q]
    assert all(int(z) == 0 for z in zero_points), [(n.name, int(z)) for n, z in
                                                   zip(activation_q, zero_points, strict=True)]
    assert sum(z.dtype.name == "int8" for z in zero_points) == counts["signed_int8"]
    images = 3 * torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED + 2))
    assert torch.equal(run_as_written(tmp_path / "openvino.onnx", images), run_as_written(path, images))


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "silu_se_block"])
def test_openvino_folds_each_activation_into_its_layer(arch: str, tmp_path: Path) -> None:
    """The file keeps FX's requantization between a conv (or linear) layer and its HardSwish,
    HardSigmoid, SiLU or Sigmoid, so ONNX Runtime runs every conv in int8 (QLinearConv); the
    model OpenVINO's runner serves has none, as NNCF places its quantizers: the layer, its
    activation and one quantizer, which OpenVINO compiles into one int8 convolution."""
    pytest.importorskip("openvino")
    import onnx

    model = torchvision_model(arch, width_mult=0.25) if arch != "silu_se_block" else silu_se_block()
    path = runtimes.export_onnx_qdq(calibrate(model, arch), (torch.zeros(1, 3, SIZE, SIZE),), tmp_path / "m.onnx")
    activations = ("HardSwish", "HardSigmoid", "Sigmoid")
    g = Graph(path)
    after_layer = sum(1 for n in g.nodes if n.op_type in activations and g.requantized_layer_output(n.input[0]))
    # what the fold has to remove: the block's three SiLUs and its gate; MobileNetV3's HardSwishes and gates
    assert (after_layer == 4) if arch == "silu_se_block" else (after_layer >= 20), g.ops

    import onnxruntime as ort

    optimized = tmp_path / "ort.onnx"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert Graph(optimized).ops["QLinearConv"] == g.ops["Conv"], Graph(optimized).ops

    folded = onnx.load(str(path))
    counts = runtimes.place_quantizers(folded, fold_activations=True)
    onnx.save(folded, str(tmp_path / "openvino.onnx"))
    f = Graph(tmp_path / "openvino.onnx")
    assert counts["folded_activations"] == after_layer, counts
    assert f.ops["QuantizeLinear"] == g.ops["QuantizeLinear"] - after_layer, (f.ops, g.ops)
    assert not [n.name for n in f.nodes if n.op_type in activations and f.requantized_layer_output(n.input[0])]

    import openvino as ov

    served = runtimes.openvino_model(path)
    quantizers = [sum(op.get_type_name() == "FakeQuantize" for op in m.get_ops())
                  for m in (ov.Core().read_model(str(path)), served)]
    assert quantizers[0] - quantizers[1] == after_layer, quantizers  # the runner reads the folded form
    runner = runtimes.load_runner("openvino", path, threads=1, batch_size=2)
    assert sum(op.get_type_name() == "FakeQuantize" for op in runner.model.get_ops()) == quantizers[1]
    precisions = Counter()
    for compiled in runner.compiled.values():
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                precisions[info["runtimePrecision"].astype(str)] += 1
    assert precisions and set(precisions) <= {"u8", "i8"}, precisions  # every convolution in int8
