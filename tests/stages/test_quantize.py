"""The quantize stage's engine (``pipeline.quant``) on real torchvision models (random weights,
32x32 inputs, 4 classes): static and dynamic conversion, closeness to fp32, TorchScript that
loads in plain torch, and a stored calibration converting to the same int8 model as the
calibrated one. The calibration choices on a trained model are in test_calibrate.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.errors import StageError
from pipeline.models import build_model
from pipeline.quant import (
    OBSERVER_KEY,
    convert_static,
    count_layers,
    export_torchscript,
    layer_table,
    observer_state,
    prepare_static,
    quantize_dynamic,
    quiet,
)

pytestmark = pytest.mark.usefixtures("one_thread")


NUM_CLASSES = 4
EXAMPLE_INPUT = (torch.zeros(1, 3, 32, 32),)
# arch -> (static int8, static fp32), (dynamic int8, dynamic fp32) conv/linear layers
EXPECTED_LAYERS = {"resnet18": ((21, 0), (1, 20)), "mobilenet_v2": ((53, 0), (1, 52))}


def calibration_batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(n)]


def calibrated(model: torch.nn.Module, arch: str, observer: str) -> torch.nn.Module:
    observed = prepare_static(model, EXAMPLE_INPUT, observer=observer, per_channel=True, backend="x86", arch=arch)
    with torch.no_grad():
        for x in calibration_batches():
            observed(x)
    return observed


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per arch: the fp32 model, its calibrated observed copy, the stored calibration (through
    torch.save / torch.load(weights_only=True), as between the calibrate and quantize stages),
    and the static and dynamic int8 models."""
    folder = tmp_path_factory.mktemp("engine")
    out = {}
    for arch in sorted(EXPECTED_LAYERS):
        torch.manual_seed(0)
        fp32 = build_model(arch, NUM_CLASSES).eval()
        observed = calibrated(fp32, arch, "minmax")
        torch.save(observer_state(observed), folder / f"{arch}-observers.pt")
        stored = torch.load(folder / f"{arch}-observers.pt", weights_only=True)
        static = convert_static(copy.deepcopy(fp32), EXAMPLE_INPUT, stored, observer="minmax", per_channel=True,
                                backend="x86", arch=arch)
        dynamic = quantize_dynamic(fp32, EXAMPLE_INPUT, backend="x86", arch=arch)
        out[arch] = {"fp32": fp32, "observed": observed, "stored": stored, "static": static, "dynamic": dynamic}
    return out


ARCHS = sorted(EXPECTED_LAYERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_convert_makes_every_conv_and_linear_int8(engine: dict, arch: str) -> None:
    rows = layer_table(engine[arch]["static"])
    assert count_layers(rows) == EXPECTED_LAYERS[arch][0]
    assert {r["precision"] for r in rows} == {"int8"}
    fp32_rows = layer_table(engine[arch]["fp32"])
    assert {r["precision"] for r in fp32_rows} == {"fp32"} and len(fp32_rows) == len(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_leaves_convolutions_fp32(engine: dict, arch: str) -> None:
    rows = layer_table(engine[arch]["dynamic"])
    assert count_layers(rows) == EXPECTED_LAYERS[arch][1]
    for r in rows:
        if r["type"] == "Linear":
            assert r["precision"] == "int8-dynamic"
        else:
            assert r["type"] == "Conv2d" and r["precision"] == "fp32"


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_models_stay_close_to_fp32(engine: dict, arch: str) -> None:
    x = calibration_batches(1)[0]
    with torch.no_grad():
        ref = engine[arch]["fp32"](x)
        for kind in ("static", "dynamic"):
            out = engine[arch][kind](x)
            assert out.shape == (8, NUM_CLASSES) and out.dtype == torch.float32
            assert torch.isfinite(out).all()
            scale = ref.abs().max().item() + 1e-6
            assert (out - ref).abs().max().item() / scale < 0.5, kind


def test_torchscript_loads_in_plain_torch(engine: dict, tmp_path: Path) -> None:
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    expected = {}
    for arch in ARCHS:
        for kind in ("static", "dynamic"):
            export_torchscript(engine[arch][kind], EXAMPLE_INPUT, tmp_path / f"{arch}-{kind}.ts")
            with torch.no_grad():
                expected[f"{arch}-{kind}"] = engine[arch][kind](x)
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("ignore")
        import torch
        folder, names = sys.argv[1], sys.argv[2:]
        x = torch.load(folder + "/x.pt", weights_only=True)
        out = {}
        for name in names:
            model = torch.jit.load(folder + "/" + name + ".ts", map_location="cpu")
            with torch.no_grad():
                out[name] = model(x)
        torch.save(out, folder + "/out.pt")
        leaked = sorted(m for m in sys.modules if m == "pipeline" or m.startswith(("pipeline.", "workers")))
        print("LEAKED", leaked)
    """)
    # run outside the repository so that `pipeline` is not even importable by accident
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *expected], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(out) == set(expected)
    for name, want in expected.items():
        assert torch.allclose(out[name], want, atol=1e-5), name


def _assert_same_int8(direct: torch.nn.Module, reused: torch.nn.Module) -> None:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(direct(x), reused(x))
    mine = reused.state_dict()
    qparams = [k for k in direct.state_dict() if k.endswith(("scale", "zero_point"))]
    assert qparams
    for k in qparams:
        assert torch.equal(direct.state_dict()[k], mine[k]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_reuse_equals_direct_convert(engine: dict, arch: str) -> None:
    """convert_static from a stored observer_state == converting the calibrated model itself."""
    from torch.ao.quantization.quantize_fx import convert_fx

    e = engine[arch]
    assert e["stored"] and all(OBSERVER_KEY in k for k in e["stored"])
    with quiet():
        direct = convert_fx(copy.deepcopy(e["observed"]))
    _assert_same_int8(direct, e["static"])
    # a calibration that does not fit the model is refused, not silently half-loaded
    partial = dict(list(e["stored"].items())[:-1])
    with pytest.raises(StageError, match="recalibrate"):
        convert_static(e["fp32"], EXAMPLE_INPUT, partial, observer="minmax", per_channel=True, backend="x86",
                       arch=arch)


def test_calibration_reuse_with_histogram_observer(engine: dict) -> None:
    from torch.ao.quantization.quantize_fx import convert_fx

    fp32 = engine["resnet18"]["fp32"]
    observed = prepare_static(fp32, EXAMPLE_INPUT, observer="histogram", per_channel=True, backend="x86",
                              arch="resnet18")
    with torch.no_grad():
        observed(calibration_batches(1)[0])
    state = observer_state(observed)
    assert any(k.endswith("histogram") for k in state)
    with quiet():
        direct = convert_fx(copy.deepcopy(observed))
    reused = convert_static(copy.deepcopy(fp32), EXAMPLE_INPUT, state, observer="histogram", per_channel=True,
                            backend="x86", arch="resnet18")
    _assert_same_int8(direct, reused)
