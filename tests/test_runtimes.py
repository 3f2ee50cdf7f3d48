"""pipeline/runtimes.py: the ONNX QDQ export of the FX int8 model and the three runners.

One ResNet18 is trained for two epochs on scikit-learn's digits at 32x32 (in process, about
15 s on one thread) and calibrated with minmax on 256 training images; the module shares it.
The comparisons run on the 359 held-out images. Tolerances are in steps of the FX model's
output quantization (its logits are int8 values ``fc.scale`` apart, 0.24 here); measured values
in brackets, the spread over six observer, weight and kept-fp32 choices where one was taken:

* the file is the FX model: the same int8 weights and weight scales, layer by layer, and the
  same output scale and zero point after every int8 layer, per channel and per tensor;
* run as written (ONNX Runtime, graph optimizations off) it is within 3 steps of the FX model
  [2], 0.1 step on average [0.02-0.09], top-1 the same on >= 99 % [99.5-100 %];
* ONNX Runtime's int8 kernels round every bias to int32 (module docstring): within 5 steps [2-3],
  0.6 step on average [0.29-0.43, against 0.50 between the FX model and fp32], top-1 the same
  on >= 95 % [97.7-99.7 %];
* OpenVINO runs the file in int8 within 5 steps of the FX model [2-3], top-1 the same as ONNX
  Runtime's on >= 95 % [98.2-99.5 %];
* with layers kept fp32 (the fc included, so the logits are float) the differences are
  measured against the logits' largest magnitude: as written 0.005 on average [0.0003], ONNX
  Runtime within 0.05 [0.014-0.028].

Every test that needs onnx, onnxscript, onnxruntime or openvino skips without them (the optional
``runtimes`` extra).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline import runtimes
from pipeline.data import Preprocess, calibration_indices, load_digits, stratified_split, to_tensors
from pipeline.errors import ConfigError, StageError
from pipeline.quant import (
    calibrated,
    convert_calibrated,
    correct_bias,
    export_torchscript,
    observer_state,
    prepare_static,
    quantizable_layers,
    quiet,
)
from pipeline.store import ArtifactRef
from pipeline.train import normalize, train_one_epoch

SIZE = 32
ARCH = "resnet18"
EXAMPLE = (torch.zeros(1, 3, SIZE, SIZE),)
SEED = 0
KEEP_FP32 = ["fc", "layer2.0.conv1"]


class Trained:
    """The trained fp32 model, its calibrated (observed) copy, the FX int8 model and the images."""

    def __init__(self) -> None:
        import torchvision

        pre = Preprocess(SIZE, SIZE)
        _, split = load_digits(pre)
        x, y = to_tensors(split)
        train, held_out = stratified_split(split.labels, 0.2, SEED)
        norm = {"mean": pre.mean, "std": pre.std}
        torch.manual_seed(SEED)
        self.fp32 = torchvision.models.get_model(ARCH, weights=None, num_classes=10)
        optimizer = torch.optim.SGD(self.fp32.parameters(), lr=0.01, momentum=0.9)
        generator = torch.Generator().manual_seed(SEED)
        for _ in range(2):
            train_one_epoch(self.fp32, x[train], y[train], optimizer, batch_size=64, device=torch.device("cpu"),
                            generator=generator, **norm)
        self.fp32.eval()
        self.calib = normalize(x[train][calibration_indices(len(train), 256, SEED)], **norm)
        self.images = normalize(x[held_out], **norm)
        observing = prepare_static(self.fp32, EXAMPLE, observer="minmax", per_channel=True, backend="x86", arch=ARCH)
        with torch.no_grad():
            observing(self.calib)
        self.statistics = observer_state(observing)
        self.observed = self.calibrate(per_channel=True)
        self.int8 = convert_calibrated(self.observed)
        self.step = float(self.int8.fc.scale)

    def calibrate(self, per_channel: bool) -> torch.nn.Module:
        return calibrated(self.fp32, EXAMPLE, self.statistics, observer="minmax", per_channel=per_channel,
                          backend="x86", arch=ARCH)

    def fx(self, qmodel: torch.nn.Module) -> torch.Tensor:
        with quiet(), torch.no_grad():
            return qmodel(self.images)


@pytest.fixture(scope="module")
def trained(one_thread) -> Trained:
    return Trained()


@pytest.fixture(scope="module")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    return runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path_factory.mktemp("onnx") / "int8.onnx")


# ----------------------------------------------------------------------------------- helpers

def run_ort(path: Path, images: torch.Tensor, *, optimized: bool, save_to: Path | None = None) -> torch.Tensor:
    """Logits from ONNX Runtime with every graph optimization (``load_runner``) or none at all
    (the graph as written: float ops between QuantizeLinear/DequantizeLinear); ``save_to``
    keeps the graph ONNX Runtime optimized."""
    import onnxruntime as ort

    if optimized and save_to is None:
        return runtimes.load_runner("onnxruntime", path, threads=1, batch_size=None)(images)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # the optimized model's "hardware specific" warning
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": images.numpy()})[0])


def distance(a: torch.Tensor, b: torch.Tensor, step: float) -> dict[str, float]:
    """Largest and mean absolute logit difference in output steps, and top-1 agreement."""
    diff = (a - b).abs()
    return {"max_steps": round(diff.max().item() / step, 3), "mean_steps": round(diff.mean().item() / step, 4),
            "top1_agreement": round((a.argmax(1) == b.argmax(1)).float().mean().item(), 4)}


def op_counts(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def layers_in(path: Path, names: list[str]) -> dict[str, dict]:
    """Each Conv/Gemm node of the ONNX file by fp32 layer name: its int8 weight, weight scale and
    zero point (None for a float weight), its bias, and the QuantizeLinear scale and zero point
    its output goes through (past a Relu), if any. Initializers are named after the reference
    model's parameters, where a fused conv + relu holds its conv at index 0."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producer.get(node.input[1])
        weight_name = dq.input[0] if dq is not None else node.input[1]
        param = weight_name.removesuffix("_quantized").removesuffix(".weight")
        name = param if param in names else param.removesuffix(".0")
        out = node.output[0]
        while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type == "Relu":
            out = consumers[out][0].output[0]
        after = [n for n in consumers.get(out, []) if n.op_type == "QuantizeLinear"]
        found[name] = {
            "int8": consts[weight_name] if dq is not None else None,
            "w_qparams": (consts[dq.input[1]], consts[dq.input[2]]) if dq is not None else None,
            "bias": consts[node.input[2]] if len(node.input) > 2 else None,
            "out_qparams": (float(consts[after[0].input[1]]), int(consts[after[0].input[2]])) if after else None}
    return found


def float_weight_layers(path: Path) -> int:
    """Conv/Gemm nodes (ONNX Runtime's fused forms included) whose weight is a float initializer."""
    import onnx

    graph = onnx.load(str(path)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return sum(1 for n in graph.node if n.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm")
               and n.input[1] in floats)


def openvino_precisions(runner) -> Counter:
    """(layer type, runtime precision) of every Convolution and FullyConnected node of each model
    an OpenVINO runner compiled, as the CPU plugin runs it."""
    found = Counter()
    for compiled in runner.compiled.values():
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind in ("Convolution", "FullyConnected"):
                found[(kind, info["runtimePrecision"].astype(str))] += 1
    return found


# ------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_the_file_holds_the_fx_int8_model(trained: Trained, exported: Path, tmp_path: Path,
                                          per_channel: bool) -> None:
    import onnx

    if per_channel:
        observed, qmodel, path = trained.observed, trained.int8, exported
    else:
        observed = trained.calibrate(per_channel=False)
        qmodel = convert_calibrated(observed)
        path = runtimes.export_onnx_qdq(observed, EXAMPLE, tmp_path / "per-tensor.onnx")
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 13
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param  # dynamic
    names = quantizable_layers(observed)
    found = layers_in(path, names)
    assert sorted(found) == sorted(names)
    modules = dict(qmodel.named_modules())
    for name in names:
        int8, layer = found[name], modules[name]
        weight = layer.weight()
        assert int8["int8"] is not None and int8["int8"].dtype.name == "int8", f"{name}: weight not int8 in the file"
        assert torch.equal(torch.from_numpy(int8["int8"]), weight.int_repr()), f"{name}: int8 weights differ"
        if per_channel:
            scales, zero_points = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        else:
            scales, zero_points = torch.tensor(weight.q_scale()), torch.tensor(weight.q_zero_point())
        assert int8["w_qparams"][0].shape == tuple(scales.shape), f"{name}: per-channel vs per-tensor differs"
        assert torch.equal(torch.from_numpy(int8["w_qparams"][0]), scales.float()), f"{name}: weight scales differ"
        assert torch.equal(torch.from_numpy(int8["w_qparams"][1]).long(), zero_points), f"{name}: zero points differ"
        assert int8["out_qparams"] == (pytest.approx(layer.scale, rel=1e-7), layer.zero_point), \
            f"{name}: output quantization {int8['out_qparams']} vs FX {(layer.scale, layer.zero_point)}"
    if not per_channel:  # the graph as written runs like the per-tensor FX model too
        got = distance(run_ort(path, trained.images, optimized=False), trained.fx(qmodel), trained.step)
        assert got["max_steps"] <= 3 and got["mean_steps"] <= 0.1 and got["top1_agreement"] >= 0.99, got


def test_onnxruntime_runs_every_layer_in_int8_close_to_the_fx_model(trained: Trained, exported: Path,
                                                                    tmp_path: Path) -> None:
    written = op_counts(exported)
    layers = len(quantizable_layers(trained.observed))
    assert written["DequantizeLinear"] > layers and written["QuantizeLinear"] > 0, written

    optimized = tmp_path / "optimized.onnx"
    kernels = run_ort(exported, trained.images, optimized=True, save_to=optimized)
    ops = op_counts(optimized)
    assert ops["QLinearConv"] + ops["QGemm"] + ops["QLinearMatMul"] == layers, ops
    assert float_weight_layers(optimized) == 0, f"float layers left: {ops}"

    fx = trained.fx(trained.int8)
    as_written = distance(run_ort(exported, trained.images, optimized=False), fx, trained.step)
    assert as_written["max_steps"] <= 3 and as_written["mean_steps"] <= 0.1, as_written
    assert as_written["top1_agreement"] >= 0.99, as_written
    int8 = distance(kernels, fx, trained.step)
    with torch.no_grad():
        fx_vs_fp32 = distance(fx, trained.fp32(trained.images), trained.step)
    assert int8["max_steps"] <= 5 and int8["mean_steps"] <= 0.6, f"ORT {int8}, FX vs fp32 {fx_vs_fp32}"
    assert int8["top1_agreement"] >= 0.95, f"ORT {int8}, FX vs fp32 {fx_vs_fp32}"

    runner = runtimes.load_runner("onnxruntime", exported, threads=1, batch_size=None)
    one = runner(trained.images[:1])  # the batch dimension is dynamic
    assert one.shape == (1, 10) and distance(one, kernels[:1], trained.step)["max_steps"] <= 1


def test_layers_kept_fp32_stay_float_in_the_file_and_the_runtimes(trained: Trained, tmp_path: Path) -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    path = runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "keep.onnx", keep_fp32=KEEP_FP32)
    found = layers_in(path, quantizable_layers(trained.observed))
    assert sorted(n for n, layer in found.items() if layer["int8"] is None) == sorted(KEEP_FP32)

    # ONNX Runtime quantizes a float layer whose input is dequantized per tensor unless shielded
    optimized = tmp_path / "optimized.onnx"
    kernels = run_ort(path, trained.images, optimized=True, save_to=optimized)
    ops = op_counts(optimized)
    assert ops["QLinearConv"] + ops["QGemm"] == len(found) - len(KEEP_FP32) and ops["QLinearAdd"] == 8, ops
    assert float_weight_layers(optimized) == len(KEEP_FP32), ops

    fx = trained.fx(convert_calibrated(trained.observed, KEEP_FP32))
    scale = fx.abs().max().item()  # the fc is float: measure against the logits' range
    as_written = distance(run_ort(path, trained.images, optimized=False), fx, scale)
    assert as_written["mean_steps"] <= 0.005 and as_written["top1_agreement"] >= 0.99, as_written
    int8 = distance(kernels, fx, scale)
    assert int8["max_steps"] <= 0.05 and int8["top1_agreement"] >= 0.95, int8

    if importlib.util.find_spec("openvino") is not None:
        precisions = openvino_precisions(runtimes.load_runner("openvino", path, threads=1, batch_size=1))
        assert sum(v for (_, p), v in precisions.items() if p in ("u8", "i8")) == len(found) - len(KEEP_FP32), \
            precisions


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openvino_runs_the_same_file_in_int8(trained: Trained, exported: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    n = len(trained.images)
    runner = runtimes.load_runner("openvino", exported, threads=1, batch_size=n)
    assert list(runner.compiled) == [(n, 3, SIZE, SIZE)]  # compiled for the static batch up front
    precisions = openvino_precisions(runner)
    int8 = sum(v for (_, p), v in precisions.items() if p in ("u8", "i8"))
    assert int8 == len(quantizable_layers(trained.observed)) == sum(precisions.values()), precisions

    logits = runner(trained.images)
    vs_ort = distance(logits, run_ort(exported, trained.images, optimized=True), trained.step)
    vs_fx = distance(logits, trained.fx(trained.int8), trained.step)
    assert vs_ort["top1_agreement"] >= 0.95 and vs_fx["max_steps"] <= 5, f"vs ORT {vs_ort}, vs FX {vs_fx}"

    ts = export_torchscript(trained.int8, EXAMPLE, tmp_path / "int8.ts")
    scripted = runtimes.load_runner("torchscript", ts, threads=1, batch_size=None)
    with torch.no_grad():
        assert torch.equal(scripted(trained.images), trained.fx(trained.int8))


def test_biases_of_a_bias_corrected_model_carry_into_the_file(trained: Trained, exported: Path,
                                                              tmp_path: Path) -> None:
    corrected = copy.deepcopy(trained.int8)
    report = correct_bias(corrected, trained.fp32, trained.calib)
    assert report["applied"], report
    biases = runtimes.int8_biases(corrected)
    names = quantizable_layers(trained.observed)
    assert sorted(biases) == sorted(names)
    path = runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "corrected.onnx", biases=biases)
    found = layers_in(path, names)
    for name in names:
        assert torch.equal(torch.from_numpy(found[name]["bias"]), biases[name]), name

    fx_corrected = trained.fx(corrected)
    with_biases = distance(run_ort(path, trained.images, optimized=False), fx_corrected, trained.step)
    without = distance(run_ort(exported, trained.images, optimized=False), fx_corrected, trained.step)
    assert with_biases["mean_steps"] <= 0.1 and without["mean_steps"] >= 4 * with_biases["mean_steps"], \
        f"vs the corrected FX model: with its biases {with_biases}, without {without}"

    with pytest.raises(StageError, match="no conv or linear layer"):
        runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "x.onnx", biases={"layer9": biases["fc"]})
    with pytest.raises(StageError, match="output channels"):
        runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "x.onnx", biases={"fc": torch.zeros(3)})


def test_export_failures_are_stage_errors_that_say_what_to_do(trained: Trained, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StageError, match="cannot keep layer9 in fp32"):
        runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "x.onnx", keep_fp32=["layer9"])
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")

    def fail(*args, **kwargs):
        raise torch.onnx.errors.OnnxExporterError("Failed to convert the exported program\nstep 3/3")

    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", fail)
        with pytest.raises(StageError, match=r"exporting the int8 model to ONNX \(x.onnx\) failed: "
                                             r"OnnxExporterError: Failed to convert the exported program\. "):
            runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "x.onnx")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnxscript", None)
        with pytest.raises(StageError, match=r"needs onnxscript, which cannot be imported: pip install 'qpipe\[runt"):
            runtimes.export_onnx_qdq(trained.observed, EXAMPLE, tmp_path / "x.onnx")


def test_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtimes.missing("torchscript") is None
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        runtimes.missing("tensorrt")
    with pytest.raises(ConfigError, match="unknown runtime"):
        runtimes.load_runner("tensorrt", Path("model.onnx"), threads=1, batch_size=None)
    for runtime in ("onnxruntime", "openvino"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, runtime, None)
            message = runtimes.missing(runtime)
            assert message is not None and "\n" not in message
            assert runtime in message and "pip install 'qpipe[runtimes]'" in message, message
            with pytest.raises(StageError, match=r"pip install 'qpipe\[runtimes\]'"):
                runtimes.load_runner(runtime, Path("model.onnx"), threads=1, batch_size=1)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_an_installed_runtime_is_not_missing(runtime: str) -> None:
    pytest.importorskip(runtime)
    assert runtimes.missing(runtime) is None


# ------------------------------------------------------------------- the fp32 baseline's forms

RUN_SPEC = {
    "name": "fp32-forms", "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
    "model": {"arch": "resnet18"},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "quantize": {"variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"}]},
    "benchmark": {"batch_sizes": [1, 4], "threads": 1, "warmup": 1, "iterations": 3, "accuracy_budget": 0.05,
                  "runtimes": list(runtimes.RUNTIMES)},
}


@pytest.fixture(scope="module")
def pipeline_run(one_thread, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole plan in process on a file store: fp32 and one static variant, each measured
    in TorchScript, on ONNX Runtime and on OpenVINO."""
    from pipeline.runner import run_in_process
    from pipeline.store import FileStore

    for package in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        pytest.importorskip(package)
    store = FileStore(tmp_path_factory.mktemp("fp32-forms"))
    return {"store": store, "summary": run_in_process(RUN_SPEC, store)}


def test_the_fp32_baseline_is_timed_on_every_runtime_and_served_on_its_fastest(pipeline_run: dict) -> None:
    import onnx

    s, store = pipeline_run["summary"], pipeline_run["store"]
    assert s["status"] == "SUCCESS", s["failures"]
    base, budget = s["baseline"], s["accuracy_budget"]
    forms = base["runtimes"]
    assert set(forms) == set(runtimes.RUNTIMES) and "skipped_runtimes" not in base
    val = s["data"]["val"]
    for rt, m in forms.items():
        assert 0 < m["accuracy_top1"] <= 1 and all(m["latency_ms_p50"][b] > 0 for b in ("1", "4")), (rt, m)
    # the float export is the same function: ONNX Runtime agrees with PyTorch but for a near tie (one image);
    # OpenVINO may run it in bf16 (CPUs with AMX), which it says
    assert abs(forms["onnxruntime"]["accuracy_top1"] - base["accuracy_top1"]) <= 1 / val + 1e-9, forms
    assert abs(forms["openvino"]["accuracy_top1"] - base["accuracy_top1"]) <= 0.05, forms
    assert forms["openvino"]["inference_precision"] in ("f32", "bf16", "f16"), forms["openvino"]
    model = onnx.load_from_string(store.get_bytes(store.key_of(forms["onnxruntime"]["artifact"])))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Conv"] == 20 and ops["Gemm"] + ops["MatMul"] == 1 and not ops["QuantizeLinear"], ops
    # served at each batch size by its fastest form within the budget of its PyTorch top-1, with that form's top-1
    for b, rt in base["runtime"].items():
        usable = {r: m for r, m in forms.items() if base["accuracy_top1"] - m["accuracy_top1"] <= budget + 1e-12}
        assert rt == min(usable, key=lambda r: usable[r]["latency_ms_p50"][b]), (b, usable)
        assert base["latency_ms_p50"][b] == forms[rt]["latency_ms_p50"][b]
        assert base["accuracy_top1_served"][b] == forms[rt]["accuracy_top1"]
        assert base["speedup_vs_fp32"][b] == 1.0
        assert base["speedup_vs_fp32_torchscript"][b] == \
            round(forms["torchscript"]["latency_ms_p50"][b] / forms[rt]["latency_ms_p50"][b], 3)


def test_each_row_carries_the_top1_of_its_served_form_and_its_speedup_over_the_fastest_fp32(
        pipeline_run: dict) -> None:
    s = pipeline_run["summary"]
    base = s["baseline"]
    [ptq] = s["variants"]
    for b, rt in ptq["runtime"].items():
        top1 = ptq["runtimes"][rt]["accuracy_top1"]
        assert ptq["accuracy_top1_served"][b] == top1, (b, rt)
        assert ptq["accuracy_drop_served"][b] == pytest.approx(base["accuracy_top1"] - top1)
        assert ptq["speedup_vs_fp32"][b] == round(base["latency_ms_p50"][b] / ptq["latency_ms_p50"][b], 3)
        assert ptq["speedup_vs_fp32_torchscript"][b] == \
            round(base["runtimes"]["torchscript"]["latency_ms_p50"][b] / ptq["latency_ms_p50"][b], 3)
    for b, pick in s["selection_per_batch"].items():
        row = next(v for v in s["variants"] if v["name"] == pick["variant"])
        assert pick["accuracy_top1"] == row["runtimes"][pick["runtime"]]["accuracy_top1"]
        assert pick["speedup_vs_fp32"] == row["speedup_vs_fp32"][b]


def test_openvino_is_measured_on_the_ir_a_deployment_reads(pipeline_run: dict) -> None:
    """Each OpenVINO form is stored as an IR (.xml and .bin) next to its benchmark manifest and
    measured from it: read with a plain ``Core.read_model`` it is the model qpipe's runner makes
    of the ONNX file (``openvino_model``: quantizers placed for OpenVINO, activations folded),
    the same ops and logits equal bit for bit."""
    import openvino as ov

    s, store = pipeline_run["summary"], pipeline_run["store"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for row in [s["baseline"], *s["variants"]]:
        bench = store.get_json(store.key_of(row["manifest"]))
        outputs, form = bench["outputs"], bench["runtimes"]["openvino"]
        assert form["artifact"] == outputs["openvino_ir"]["uri"] and form["artifact"].endswith("/model.xml")
        assert form["size_bytes"] == outputs["openvino_ir"]["size"] + outputs["weights"]["size"]
        folder = Path(store.fetch(ArtifactRef.from_dict(outputs["openvino_ir"]), Path(store.root) / "x" / row["name"]
                                  / "model.xml")).parent
        store.fetch(ArtifactRef.from_dict(outputs["weights"]), folder / "model.bin")
        onnx_file = store.fetch(ArtifactRef.from_dict(outputs["onnx"]), folder / "model.onnx")
        ir = ov.Core().read_model(str(folder / "model.xml"))
        ops = [Counter(op.get_type_name() for op in m.get_ops()) for m in (ir, runtimes.openvino_model(onnx_file))]
        assert ops[0] == ops[1] and (ops[0]["FakeQuantize"] > 0) == (row["method"] == "static"), ops
        assert torch.equal(runtimes.OvRunner(ir, 1)(x), runtimes.load_runner("openvino", onnx_file, threads=1,
                                                                                 batch_size=None)(x))
    # what `qpipe pull --runtime openvino` hands a deployment: that IR, and a README that reads it
    from pipeline.registry import pull

    got = pull(store, s["run_id"], Path(store.root) / "pulled", variant="ptq-minmax", runtime="openvino")
    assert {n for n, f in got.files.items() if f.get("model")} == {"model.xml", "model.bin"}, got.files
    assert {b: f["file"] for b, f in got.serving.items()} == {"1": "model.xml", "4": "model.xml"}
    assert 'compile_model("model.xml", "CPU")' in (got.folder / "README.md").read_text()


def test_openvino_reads_hardsigmoid_as_the_hsigmoid_it_fuses(tmp_path: Path) -> None:
    """torch's Hardsigmoid (ONNX HardSigmoid, alpha 1/6) becomes OpenVINO's HSigmoid, which its
    CPU plugin fuses into the layer before it; another alpha stays a HardSigmoid. Same values."""
    pytest.importorskip("openvino")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Hardsigmoid(), torch.nn.Conv2d(4, 4, 1),
                              torch.nn.Hardtanh(0.0, 1.0)).eval()
    path = runtimes.export_onnx_fp32(net, (torch.randn(1, 3, 8, 8),), tmp_path / "hs.onnx")
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("HardSigmoid", ["logits"], ["other"], alpha=0.2, beta=0.5))
    model.graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    ops = Counter(op.get_type_name() for op in runtimes.openvino_model(path).get_ops())
    assert ops["HSigmoid"] == 1 and ops["HardSigmoid"] == 1, ops
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
    got = runtimes.OvRunner(runtimes.openvino_model(path), 1)(x)
    assert torch.allclose(got, want, atol=1e-2), (got - want).abs().max()


def test_a_runtime_that_cannot_be_imported_is_skipped_and_the_cli_says_why(
        pipeline_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO made unimportable in this process: the benchmarks (rerun: another iteration
    count; fine-tuning and quantization come from the store's cache) measure the other forms,
    record why OpenVINO was skipped, and ``qpipe run``'s summary prints it."""
    import io

    from pipeline.runner import run_in_process
    from workers.cli import print_summary

    spec = copy.deepcopy(RUN_SPEC)
    spec["benchmark"]["iterations"] = 2
    events: dict[str, str] = {}
    monkeypatch.setitem(sys.modules, "openvino", None)
    s = run_in_process(spec, pipeline_run["store"], on_event=events.__setitem__)
    assert events["finetune"] == events["quantize:ptq-minmax"] == "cached"
    assert events["benchmark:fp32"] == events["benchmark:ptq-minmax"] == "done"
    why = runtimes.missing("openvino")
    assert why is not None and "pip install 'qpipe[runtimes]'" in why
    for row in (s["baseline"], *s["variants"]):
        assert row["skipped_runtimes"] == {"openvino": why}, row["name"]
        assert set(row["runtimes"]) == {"torchscript", "onnxruntime"} and "openvino" not in row["runtime"].values()
    out = io.StringIO()
    print_summary(s, out=out)
    assert f"runtime openvino skipped for fp32, ptq-minmax: {why}" in out.getvalue().splitlines(), out.getvalue()


def test_fp32_export_failures_are_stage_errors_that_say_what_to_do(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = torchvision.models.get_model(ARCH, weights=None, num_classes=10)

    def fail(*args, **kwargs):
        raise torch.onnx.errors.OnnxExporterError("Failed to convert the exported program\nstep 3/3")

    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", fail)
        with pytest.raises(StageError, match=r"exporting the fp32 model to ONNX \(x.onnx\) failed: "
                                             r"OnnxExporterError: Failed to convert the exported program\. "):
            runtimes.export_onnx_fp32(model, EXAMPLE, tmp_path / "x.onnx")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnxscript", None)
        with pytest.raises(StageError, match=r"needs onnxscript, which cannot be imported: pip install 'qpipe\[runt"):
            runtimes.export_onnx_fp32(model, EXAMPLE, tmp_path / "x.onnx")
