"""The quantization engine: the only module that touches torch's quantization APIs.

qpipe uses FX graph mode quantization (``torch.ao.quantization.quantize_fx``): on torch 2.14 it
converts resnet18, mobilenet_v2/v3, efficientnet_b0, convnext_tiny and regnet_y_400mf, while the
export-based ``prepare_pt2e`` flow failed on resnet18's conv + add + relu pattern. torch marks
``torch.ao.quantization`` and ``torch.jit`` as deprecated; keeping every call here lets the
export-based flow replace this module without touching the stages.

Static quantization is split in two so one calibration serves several quantizations:
``prepare_static`` + ``calibrate`` produce observer statistics (``observer_state``), and
``convert_static`` rebuilds the observed graph from the fp32 model, loads those statistics and
converts. Weights are quantized per channel (qint8, symmetric) unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import StageError

log = logging.getLogger(__name__)
OBSERVER_KEY = "activation_post_process"
ENGINE = "torch.ao.quantization FX graph mode"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's deprecation notices for the APIs this module wraps on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        yield


def set_engine(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise StageError(f"quantized engine {backend!r} is not available in this torch build "
                         f"(supported: {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = backend


def _qconfig(observer: str, per_channel: bool, backend: str):
    from torch.ao.quantization import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
    )

    reduce_range = backend == "x86"  # what torch's own x86 default does for activations
    activation = {
        "minmax": MinMaxObserver,
        "moving_average_minmax": MovingAverageMinMaxObserver,
        "histogram": HistogramObserver,
    }[observer].with_args(reduce_range=reduce_range)
    if per_channel:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=activation, weight=weight)


def _prepare(fn, model: nn.Module, mapping, example: tuple[torch.Tensor, ...], arch: str) -> nn.Module:
    import torch.fx

    try:
        with quiet():
            return fn(model, mapping, example)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, AssertionError, RuntimeError) as err:
        raise StageError(
            f"{arch} cannot be prepared for int8 by {ENGINE}: {type(err).__name__}: {str(err)[:400]}. "
            "Supported archs are listed in the README (resnet, mobilenet_v2/v3, efficientnet, regnet, "
            "convnext); use one of them or a dynamic-only variant") from None


def prepare_static(model: nn.Module, example: tuple[torch.Tensor, ...], *, observer: str,
                   per_channel: bool, backend: str, arch: str) -> nn.Module:
    """An observed copy of ``model`` (eval mode) ready for calibration."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    set_engine(backend)
    with quiet():
        mapping = get_default_qconfig_mapping(backend).set_global(_qconfig(observer, per_channel, backend))
    return _prepare(prepare_fx, copy.deepcopy(model).eval(), mapping, example, arch)


def observer_state(observed: nn.Module) -> dict[str, torch.Tensor]:
    """The calibration result: every activation observer's buffers, nothing else."""
    return {k: v.detach().clone() for k, v in observed.state_dict().items() if OBSERVER_KEY in k}


def convert_static(model: nn.Module, example: tuple[torch.Tensor, ...], observers: dict[str, torch.Tensor], *,
                   observer: str, per_channel: bool, backend: str, arch: str) -> nn.Module:
    """Rebuild the observed graph, load stored observer statistics, convert to int8."""
    from torch.ao.quantization.quantize_fx import convert_fx

    observed = prepare_static(model, example, observer=observer, per_channel=per_channel, backend=backend,
                              arch=arch)
    expected = {k for k in observed.state_dict() if OBSERVER_KEY in k}
    if expected != set(observers):
        raise StageError("the stored calibration does not match the model's observers "
                         f"({len(expected ^ set(observers))} differ): recalibrate")
    with quiet():
        observed.load_state_dict(observers, strict=False)
        return convert_fx(observed)


def quantize_dynamic(model: nn.Module, example: tuple[torch.Tensor, ...], *, backend: str, arch: str) -> nn.Module:
    """Dynamic quantization: int8 weights, activations quantized on the fly. Covers nn.Linear
    only; convolutions stay fp32 (the layer table says so)."""
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    set_engine(backend)
    mapping = QConfigMapping().set_object_type(nn.Linear, default_dynamic_qconfig)
    observed = _prepare(prepare_fx, copy.deepcopy(model).eval(), mapping, example, arch)
    with quiet():
        return convert_fx(observed)


def prepare_qat(model: nn.Module, example: tuple[torch.Tensor, ...], *, backend: str, arch: str) -> nn.Module:
    """A fake-quantized copy of ``model`` in train mode for quantization-aware training."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    set_engine(backend)
    with quiet():
        mapping = get_default_qat_qconfig_mapping(backend)
    return _prepare(prepare_qat_fx, copy.deepcopy(model).train(), mapping, example, arch)


def convert_qat(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet():
        return convert_fx(prepared.cpu().eval())


def layer_table(model: nn.Module) -> list[dict[str, str]]:
    """Every convolution and linear layer with the precision it runs in."""
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nnqd.Linear):
            rows.append({"layer": name, "type": type(m).__name__, "precision": "int8-dynamic"})
        elif isinstance(m, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)):
            rows.append({"layer": name, "type": type(m).__name__, "precision": "int8"})
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            rows.append({"layer": name, "type": type(m).__name__, "precision": "fp32"})
    return rows


def count_layers(rows: list[dict[str, str]]) -> tuple[int, int]:
    int8 = sum(1 for r in rows if r["precision"].startswith("int8"))
    return int8, len(rows) - int8


def export_torchscript(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Trace, freeze and save: the file loads with plain ``torch.jit.load``."""
    model = model.cpu().eval()
    with quiet(), torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.trace(model, example))
        torch.jit.save(scripted, str(path))
    return path


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with quiet():
        return torch.jit.load(str(path), map_location="cpu")
