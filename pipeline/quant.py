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

Activation observers (``OBSERVERS``): torch's ``minmax``, ``moving_average_minmax`` and
``histogram`` (torch's greedy L2 search), and three range searches of ours over the same
histogram: ``percentile``, ``mse`` and ``entropy``. The four histogram observers record the same
statistics (``histogram``, ``min_val``, ``max_val``), so one calibration serves all of them and
the range is chosen at conversion (``CALIBRATION_STATISTIC``). Every search is a deterministic
function of those tensors: the same calibration gives the same int8 model.

Activation schemes (``ACTIVATION_SCHEMES``, chosen at conversion: the statistics are the same):

* ``symmetric`` (the default), the scheme OpenVINO's and NNCF's fast int8 kernels read: a tensor
  that is never negative (after a ReLU or ReLU6) gets uint8 with zero point 0 over [0, max]; a
  signed one (a residual sum, a projection, the normalized image) a range symmetric about zero,
  uint8 with zero point 128, which ``pipeline.runtimes.openvino_model`` writes as int8 with zero
  point 0 (the same integers minus 128). All 8 bits, as OpenVINO and NNCF use them (torch's x86
  default keeps 7, ``reduce_range``, for CPUs without VNNI: there, TorchScript's int8 kernels may
  saturate on large activations; the benchmark measures each served form's top-1).
* ``asymmetric``: torch's x86 default, uint8 over [min, max] with whatever zero point fits, 7
  bits. On OpenVINO a convolution reading a zero point other than 0 pays for compensating it
  (measured: mobilenet_v2's 1x1 convolutions up to 2.5x slower than on the same tensor as int8).

Either way the observer of a conv whose output goes through ReLU6 records the clamped output
(``_observe_after_relu6``): FX gives ReLU6 its input's observer, which otherwise spends half the
range on the negative values the ReLU6 removes. ``prepare_qat`` takes the same schemes (symmetric
by default), so QAT models are served on OpenVINO in the same form.

``correct_bias`` is the optional empirical bias correction applied after conversion.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantize
from torch.ao.quantization.observer import HistogramObserver, ObserverBase

from pipeline.errors import StageError
from pipeline.spec import CALIBRATION_STATISTIC, DEFAULT_PERCENTILE, OBSERVERS  # the one observer table

log = logging.getLogger(__name__)
OBSERVER_KEY = "activation_post_process"
ENGINE = "torch.ao.quantization FX graph mode"


# ------------------------------------------------------------------------ activation observers

class _RangeSearchObserver(HistogramObserver):
    """A HistogramObserver whose clipping range comes from ``_search_range`` instead of torch's
    greedy L2 search. It records exactly what HistogramObserver records (``histogram``,
    ``min_val``, ``max_val``), so a histogram calibration loads into any subclass."""

    def _search_range(self, hist: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
        raise NotImplementedError

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.min_val.item(), self.max_val.item()
        hist = self.histogram.detach().to(torch.float64).cpu()
        if not hi > lo or hist.sum().item() <= 0:
            return self.min_val, self.max_val
        edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
        new_lo, new_hi = self._search_range(hist, edges)
        # never widen the observed range, and keep zero representable as the base class does
        new_lo, new_hi = max(new_lo, lo), min(new_hi, hi)
        if new_hi <= new_lo:
            new_lo, new_hi = lo, hi
        return (torch.tensor(new_lo, dtype=self.min_val.dtype, device=self.min_val.device),
                torch.tensor(new_hi, dtype=self.max_val.dtype, device=self.max_val.device))

    @property
    def _levels(self) -> int:
        return int(self.quant_max - self.quant_min + 1)


class PercentileObserver(_RangeSearchObserver):
    """Clip to the ``percentile``-th percentile of the values at the top and to the
    (100 - ``percentile``)-th at the bottom, rounded outwards to the histogram's bin edges."""

    def __init__(self, percentile: float = DEFAULT_PERCENTILE, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _search_range(self, hist: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
        cdf = torch.cumsum(hist, 0) / hist.sum()
        q = self.percentile / 100.0
        top = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype)).clamp(max=self.bins - 1))
        bottom = int(torch.searchsorted(cdf, torch.tensor([1.0 - q], dtype=cdf.dtype), right=True)
                     .clamp(max=self.bins - 1))
        return edges[bottom].item(), edges[top + 1].item()

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, " + super().extra_repr()


class MSEObserver(_RangeSearchObserver):
    """The clipping range [a, b] (bin edges, a <= 0 <= b) with the least expected squared error
    over the histogram: rounding error step^2/12 for each value inside the range plus the
    squared distance to the range for each value clipped (a bin's values spread evenly over
    it). Every pair of candidate edges is evaluated, with prefix sums, so the search is exact
    on the histogram's grid."""

    def _search_range(self, hist: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
        width = (edges[1] - edges[0]).item()
        centers = (edges[:-1] + edges[1:]) / 2
        zero = torch.zeros(1, dtype=hist.dtype)
        count = torch.cat([zero, torch.cumsum(hist, 0)])  # count[j] = values in bins < j
        first = torch.cat([zero, torch.cumsum(hist * centers, 0)])
        second = torch.cat([zero, torch.cumsum(hist * centers * centers, 0)])
        total_n, total_1, total_2 = count[-1], first[-1], second[-1]
        # candidate lower edges are <= 0 (or just the minimum), upper edges >= 0 (or just the maximum)
        lower = torch.nonzero(edges <= 0).flatten() if edges[0] < 0 else torch.zeros(1, dtype=torch.long)
        upper = torch.nonzero(edges >= 0).flatten() if edges[-1] > 0 else torch.tensor([self.bins])
        a, b = edges[lower], edges[upper]
        # squared distance of every value below a to a, above b to b (+ in-bin variance)
        below = second[lower] - 2 * a * first[lower] + a * a * count[lower] + count[lower] * width ** 2 / 12
        n_above = total_n - count[upper]
        above = ((total_2 - second[upper]) - 2 * b * (total_1 - first[upper]) + b * b * n_above
                 + n_above * width ** 2 / 12)
        span = b.clamp(min=0).view(1, -1) - a.clamp(max=0).view(-1, 1)
        if self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
            span = 2 * torch.maximum(b.clamp(min=0).view(1, -1), -a.clamp(max=0).view(-1, 1))
        step = span / (self._levels - 1)
        inside = (count[upper].view(1, -1) - count[lower].view(-1, 1)).clamp(min=0)
        error = inside * step * step / 12 + below.view(-1, 1) + above.view(1, -1)
        best = int(torch.argmin(error))  # the first minimum: ties resolve the same way every time
        i, j = divmod(best, len(upper))
        return a[i].item(), b[j].item()


class EntropyObserver(_RangeSearchObserver):
    """KL-divergence calibration, one side of zero at a time: for the values above zero (and,
    mirrored, those below), the threshold whose clipped and quantized distribution diverges
    least from the observed one (``_min_kl_threshold``). A side gets the share of quantization
    levels that its observed extent has of the whole range."""

    def _search_range(self, hist: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
        lo, hi = edges[0].item(), edges[-1].item()
        centers = (edges[:-1] + edges[1:]) / 2
        extent = {1: max(hi, 0.0), -1: max(-lo, 0.0)}
        found = {1: 0.0, -1: 0.0}
        for sign, reach in extent.items():
            side = (centers * sign) >= 0
            if reach <= 0 or not side.any():
                continue
            # this side's values as a histogram of |x| over [0, reach] on as many bins
            idx = ((centers[side] * sign) / reach * self.bins).floor().long().clamp(0, self.bins - 1)
            folded = torch.zeros(self.bins, dtype=hist.dtype).index_add_(0, idx, hist[side])
            # the exact zeros a ReLU makes would dominate the divergence: count the first bin
            # like its neighbour, as TensorRT-style entropy calibrators do
            folded[0] = folded[1]
            levels = max(2, round(self._levels * reach / (extent[1] + extent[-1])))
            found[sign] = reach * _min_kl_threshold(folded, levels) / self.bins
        return (-found[-1] if lo < 0 else lo), (found[1] if hi > 0 else hi)


def _min_kl_threshold(hist: torch.Tensor, levels: int) -> int:
    """The number of leading bins j (levels <= j <= len(hist)) to keep: the one whose clipped
    distribution P (the mass of bins >= j added to bin j-1) diverges least, in KL(P || Q), from
    Q, which merges P's first j bins into ``levels`` groups and spreads each group's mass evenly
    over its non-empty bins. Both sums of KL = sum P log P - sum P log Q reduce to prefix sums,
    so every candidate j is evaluated at once in O(levels)."""
    bins = len(hist)
    if bins <= levels:
        return bins
    total = hist.sum()
    zero = torch.zeros(1, dtype=hist.dtype)
    cum = torch.cat([zero, torch.cumsum(hist, 0)])  # cum[k] = mass of bins < k
    cum_nonempty = torch.cat([zero, torch.cumsum((hist > 0).to(hist.dtype), 0)])
    cum_hlogh = torch.cat([zero, torch.cumsum(torch.xlogy(hist, hist), 0)])
    j = torch.arange(levels, bins + 1)
    outliers = total - cum[j]
    last = hist[j - 1] + outliers  # P's last bin
    # sum P log P (P normalized by the total, which clipping does not change)
    p_log_p = (cum_hlogh[j - 1] - cum[j - 1] * total.log() + torch.xlogy(last, last / total)) / total
    # group g of the j kept bins is [ceil(g j / levels), ceil((g+1) j / levels))
    g = torch.arange(levels + 1)
    bounds = torch.div(g.view(1, -1) * j.view(-1, 1) + levels - 1, levels, rounding_mode="floor")
    mass = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]  # Q's mass per group, before normalization
    support = cum_nonempty[bounds[:, 1:]] - cum_nonempty[bounds[:, :-1]]
    support[:, -1] += ((hist[j - 1] == 0) & (outliers > 0)).to(hist.dtype)  # the bin the outliers made
    p_mass = mass.clone()
    p_mass[:, -1] += outliers
    q_bin = mass / support.clamp(min=1) / (total - outliers).clamp(min=1e-300).view(-1, 1)
    p_log_q = (p_mass / total * q_bin.clamp(min=1e-12).log()).sum(1)
    kl = p_log_p - p_log_q
    return int(j[int(torch.argmin(kl))])  # the first minimum: the same j every time


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


ACTIVATION_SCHEMES = ("symmetric", "asymmetric")
DEFAULT_ACTIVATIONS = "symmetric"


def _is_symmetric(activations: str) -> bool:
    """Whether ``activations`` is the symmetric scheme; StageError for an unknown one."""
    if activations not in ACTIVATION_SCHEMES:
        raise StageError(f"unknown activation scheme {activations!r}: use one of {', '.join(ACTIVATION_SCHEMES)}")
    return activations == "symmetric"


class _SymmetricIfSigned:
    """Mixin for an activation observer (before it in the bases): the range it chose, made
    symmetric about zero when it reaches below zero ([-b, b], b the larger extent: uint8 with
    zero point 128 on a full 0..255 range); a range that starts at zero keeps zero point 0."""

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor):
        if min_val.numel() != 1 or float(min_val) >= 0:
            return super()._calculate_qparams(min_val, max_val)
        bound = torch.maximum(-min_val, max_val)
        scale, zero_point = super()._calculate_qparams(-bound, bound)
        # the middle of the range, set rather than rounded: b / (2b / 255) may round to 127
        return scale, zero_point.fill_((self.quant_min + self.quant_max + 1) // 2)


@functools.cache
def _symmetric(observer: type) -> type:
    """``observer`` with the symmetric scheme (one class per observer, so copies share it)."""
    return type(f"Symmetric{observer.__name__}", (_SymmetricIfSigned, observer), {"__module__": __name__})


@functools.cache
def _after_relu6(observer: type) -> type:
    """``observer`` recording ``clamp(x, 0, 6)``: what the ReLU6 that shares it leaves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observer.forward(self, x.clamp(0.0, 6.0))
        return x

    return type(f"AfterRelu6{observer.__name__}", (observer,), {"forward": forward, "__module__": __name__})


def _is_relu6(gm: nn.Module, node) -> bool:
    import torch.nn.functional as F

    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0)
    return node.op == "call_function" and node.target in (F.relu6, torch.ops.aten.relu6.default)


def _observe_after_relu6(gm: nn.Module) -> int:
    """Give every observer that a ReLU6 shares with its input (FX's rule for ReLU6: the conv
    before it is requantized with the ReLU6's scale; in QAT, the observer of the unfused
    fake-quantizer it shares) the clamped view of what it sees: its range
    is then [0, max <= 6], zero point 0, instead of the conv output's signed range, half of it
    cut off by the ReLU6. The int8 model is the same function (quantizing to [0, 6] with zero
    point 0 saturates as the ReLU6 clamps), with twice the resolution. Returns how many."""
    changed = 0
    for node in gm.graph.nodes:
        if not _is_relu6(gm, node) or not node.args or getattr(node.args[0], "op", None) != "call_module":
            continue
        before = gm.get_submodule(node.args[0].target)
        after = [gm.get_submodule(u.target) for u in node.users if u.op == "call_module"]
        if not any(a is before for a in after):
            continue  # an observer of its own after the ReLU6 already sees the clamped values
        if type(before) is FakeQuantize:  # QAT: the observer inside the fake-quantizer
            before = before.activation_post_process
        if isinstance(before, ObserverBase) and not type(before).__name__.startswith("AfterRelu6"):
            before.__class__ = _after_relu6(type(before))
            changed += 1
    return changed


def set_engine(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise StageError(f"quantized engine {backend!r} is not available in this torch build "
                         f"(supported: {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = backend


def _qconfig(observer: str, per_channel: bool, backend: str, percentile: float | None = None,
             activations: str = DEFAULT_ACTIVATIONS):
    from torch.ao.quantization import (
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
    )

    if observer not in CALIBRATION_STATISTIC:
        raise StageError(f"unknown observer {observer!r}: use one of {', '.join(OBSERVERS)}")
    if percentile is not None and observer != "percentile":
        raise StageError(f"percentile={percentile} only applies to the percentile observer, not {observer!r}")
    symmetric = _is_symmetric(activations)
    # torch's own x86 default keeps 7 bits of activation (reduce_range); the symmetric scheme
    # uses all 8, as OpenVINO's kernels do: zero point 128 must be the middle of the range
    reduce_range = backend == "x86" and not symmetric
    activation = {
        "minmax": MinMaxObserver,
        "moving_average_minmax": MovingAverageMinMaxObserver,
        "histogram": HistogramObserver,
        "percentile": PercentileObserver,
        "mse": MSEObserver,
        "entropy": EntropyObserver,
    }[observer]
    args = {"reduce_range": reduce_range}
    if observer == "percentile":
        args["percentile"] = DEFAULT_PERCENTILE if percentile is None else percentile
    if per_channel:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=(_symmetric(activation) if symmetric else activation).with_args(**args), weight=weight)


def _prepare(fn, model: nn.Module, mapping, example: tuple[torch.Tensor, ...], arch: str) -> nn.Module:
    import torch.fx

    try:
        with quiet():
            prepared = fn(model, mapping, example)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, AssertionError, RuntimeError) as err:
        raise StageError(
            f"{arch} cannot be prepared for int8 by {ENGINE}: {type(err).__name__}: {str(err)[:400]}. "
            "Supported archs are listed in the README (resnet, mobilenet_v2/v3, efficientnet, regnet, "
            "convnext); use one of them or a dynamic-only variant") from None
    _observe_after_relu6(prepared)
    return prepared


def prepare_static(model: nn.Module, example: tuple[torch.Tensor, ...], *, observer: str,
                   per_channel: bool, backend: str, arch: str, percentile: float | None = None,
                   activations: str = DEFAULT_ACTIVATIONS) -> nn.Module:
    """An observed copy of ``model`` (eval mode) ready for calibration. To calibrate for several
    observers at once, calibrate with ``CALIBRATION_STATISTIC[observer]``: the statistics are the
    same, only the range chosen from them at conversion differs (and the activation scheme)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    set_engine(backend)
    with quiet():
        mapping = get_default_qconfig_mapping(backend).set_global(
            _qconfig(observer, per_channel, backend, percentile, activations))
    return _prepare(prepare_fx, copy.deepcopy(model).eval(), mapping, example, arch)


def observer_state(observed: nn.Module) -> dict[str, torch.Tensor]:
    """The calibration result: every activation observer's buffers, nothing else."""
    return {k: v.detach().clone() for k, v in observed.state_dict().items() if OBSERVER_KEY in k}


def calibrated(model: nn.Module, example: tuple[torch.Tensor, ...], observers: dict[str, torch.Tensor], *,
               observer: str, per_channel: bool, backend: str, arch: str,
               percentile: float | None = None, activations: str = DEFAULT_ACTIVATIONS) -> nn.Module:
    """Rebuild the observed graph of ``model`` and load stored observer statistics (recorded by
    an observer with the same ``CALIBRATION_STATISTIC``): ready for ``convert_calibrated``."""
    observed = prepare_static(model, example, observer=observer, per_channel=per_channel, backend=backend,
                              arch=arch, percentile=percentile, activations=activations)
    expected = {k for k in observed.state_dict() if OBSERVER_KEY in k}
    if expected != set(observers):
        raise StageError("the stored calibration does not match the model's observers "
                         f"({len(expected ^ set(observers))} differ): recalibrate")
    with quiet():
        observed.load_state_dict(observers, strict=False)
    observed.qpipe_qconfig = (observer, per_channel, backend, percentile, activations)  # convert_calibrated's
    return observed


def static_mapping(observed: nn.Module, keep_fp32: Sequence[str] = ()):
    """The qconfig mapping ``observed`` was prepared with, with each layer named in
    ``keep_fp32`` (a conv or linear layer's module name in the fp32 model) set to stay fp32."""
    from torch.ao.quantization import get_default_qconfig_mapping

    with quiet():
        mapping = get_default_qconfig_mapping(observed.qpipe_qconfig[2]).set_global(_qconfig(*observed.qpipe_qconfig))
    for name in keep_fp32:
        mapping.set_module_name(name, None)
    return mapping


def convert_calibrated(observed: nn.Module, keep_fp32: Sequence[str] = ()) -> nn.Module:
    """Convert a copy of a calibrated model (``calibrated``) to int8, keeping the layers named in
    ``keep_fp32`` in fp32: the ranges all come from the one calibration, so a layer kept fp32
    changes nothing else (its neighbours quantize and dequantize around it)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    unknown = sorted(set(keep_fp32) - set(quantizable_layers(observed)))
    if unknown:
        raise StageError(f"cannot keep {', '.join(unknown)} in fp32: no such quantizable layer")
    with quiet():
        return convert_fx(copy.deepcopy(observed), qconfig_mapping=static_mapping(observed, keep_fp32))


def quantizable_layers(model: nn.Module) -> list[str]:
    """The conv and linear layers of an observed (or fp32) model, by module name, in order; a
    fused conv + relu is named by its fused module (the conv's name in the fp32 model)."""
    from torch.ao.nn.intrinsic import _FusedModule

    names = []
    for name, m in model.named_modules():
        if isinstance(m, _FusedModule) or (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                                           and not any(name.startswith(f + ".") for f in names)):
            names.append(name)
    return names


def convert_static(model: nn.Module, example: tuple[torch.Tensor, ...], observers: dict[str, torch.Tensor], *,
                   observer: str, per_channel: bool, backend: str, arch: str,
                   percentile: float | None = None, keep_fp32: Sequence[str] = (),
                   activations: str = DEFAULT_ACTIVATIONS) -> nn.Module:
    """Rebuild the observed graph, load stored observer statistics, choose each activation's
    range with ``observer`` and ``activations`` and convert to int8 (``keep_fp32``: layers left in fp32)."""
    observed = calibrated(model, example, observers, observer=observer, per_channel=per_channel,
                          backend=backend, arch=arch, percentile=percentile, activations=activations)
    return convert_calibrated(observed, keep_fp32)


def _float_twin(qmodule: nn.Module, reference: nn.Module | None) -> nn.Module | None:
    """The fp32 layer (conv or linear, without its fused activation) ``qmodule`` was made from."""
    from torch.ao.nn.intrinsic import _FusedModule

    if isinstance(reference, _FusedModule):
        reference = reference[0]
    float_type = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear}
    for base, ftype in float_type.items():
        if base in {c.__name__ for c in type(qmodule).__mro__} and type(reference) is ftype:
            return reference
    return None


def _preactivation(qmodule: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel accumulates before requantizing (and before a fused ReLU): the layer
    applied to the dequantized input with the dequantized weight and the bias."""
    import torch.nn.functional as F

    w = qmodule.weight().dequantize()
    if w.dim() == 2:
        return F.linear(x.dequantize(), w, qmodule.bias())
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x.dequantize(), w, qmodule.bias(), qmodule.stride, qmodule.padding, qmodule.dilation,
                qmodule.groups)


class _ChannelMean:
    """Running mean per output channel (dim 1, or the last dim of a linear layer's 2-d output)
    over every other dimension, accumulated in float64."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, y: torch.Tensor) -> None:
        y = y.detach()
        flat = y.t() if y.dim() == 2 else y.transpose(0, 1).reshape(y.shape[1], -1)
        self.total = self.total + flat.double().sum(1)
        self.count += flat.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


# bias correction runs its images through the int8 model as one batch: at most this many (256
# images at 224x224 hold about 200 MB in ResNet18's largest int8 activation)
BIAS_CORRECTION_IMAGES = 512
BIAS_CORRECTION_CHUNK = 32  # images per float computation inside that pass


def correct_bias(qmodel: nn.Module, model: nn.Module, images: torch.Tensor) -> dict:
    """Empirical bias correction of a converted static int8 model, in place.

    ``images`` are calibration images, normalized (at most ``BIAS_CORRECTION_IMAGES`` are used).
    For each int8 convolution or linear layer, in execution order, the correction is the mean per
    output channel, over the images and positions, of (int8 accumulator - fp32 output): the int8
    accumulator is the layer's output before requantization and before a fused ReLU (computed
    in float from its dequantized input and weight), the fp32 output is the same layer's output
    in the fp32 model (batch norm folded, no ReLU). That mean is subtracted from the layer's
    bias. The images go through the int8 model as one batch and each layer is corrected just
    before it runs, so every correction sees the corrected layers before it and removes the
    systematic per-channel error that weight rounding and upstream activation quantization add.
    Weights, scales and zero points are unchanged. Layers without an fp32 counterpart of the
    same name (other engines, unusual fusions) are left alone.

    Matching means is not the same as lowering the error: where the corrected model's outputs
    are further from fp32 on these images (mean squared error over all outputs) than the
    uncorrected model's, every bias is put back and ``applied`` is false.

    Returns ``{"applied", "images", "output_mse_before", "output_mse_after", "layers"}``, with one
    row per layer: its name and the mean and largest absolute shift of its bias.
    """
    from torch.ao.quantization.quantize_fx import fuse_fx

    images = images[:BIAS_CORRECTION_IMAGES]
    if len(images) == 0:
        raise StageError("bias correction needs calibration images, and there are none")
    with quiet():
        reference = fuse_fx(copy.deepcopy(model).cpu().eval())
    ref_modules = dict(reference.named_modules())
    targets: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, m in qmodel.named_modules():
        twin = _float_twin(m, ref_modules.get(name)) if hasattr(m, "set_weight_bias") else None
        if twin is not None and getattr(twin, "padding_mode", "zeros") == "zeros":
            targets[name] = (m, twin)
    original = {name: (m.weight(), m.bias()) for name, (m, _) in targets.items()}

    # the fp32 outputs' means, every layer in one chunked pass, and the model's outputs
    fp32_means = {name: _ChannelMean() for name in targets}
    hooks = [twin.register_forward_hook(lambda mod, args, out, n=name: fp32_means[n].add(out))
             for name, (_, twin) in targets.items()]
    try:
        with torch.no_grad():
            fp32_out = torch.cat([reference(x) for x in torch.split(images, BIAS_CORRECTION_CHUNK)])
    finally:
        for h in hooks:
            h.remove()

    rows: list[dict] = []

    def correct(name: str, qmodule: nn.Module, args: tuple) -> None:
        if any(r["layer"] == name for r in rows):  # a layer called twice is corrected once
            return
        int8_mean = _ChannelMean()
        for x in torch.split(args[0], BIAS_CORRECTION_CHUNK):
            int8_mean.add(_preactivation(qmodule, x))
        error = int8_mean.mean - fp32_means[name].mean
        bias = qmodule.bias()
        bias = torch.zeros(error.shape, dtype=torch.float64) if bias is None else bias.detach().double()
        qmodule.set_weight_bias(qmodule.weight(), (bias - error).float())
        rows.append({"layer": name, "mean_abs_shift": float(f"{error.abs().mean().item():.6g}"),
                     "max_abs_shift": float(f"{error.abs().max().item():.6g}")})

    with quiet(), torch.no_grad():
        before = torch.cat([qmodel(x) for x in torch.split(images, BIAS_CORRECTION_CHUNK)])
    hooks = [qmodule.register_forward_pre_hook(lambda mod, args, n=name: correct(n, mod, args))
             for name, (qmodule, _) in targets.items()]
    try:
        with quiet(), torch.no_grad():
            after = qmodel(images)  # each layer corrected just before it ran: the corrected model's output
    finally:
        for h in hooks:
            h.remove()
    mse_before = (before - fp32_out).pow(2).mean().item()
    mse_after = (after - fp32_out).pow(2).mean().item()
    applied = mse_after <= mse_before
    if not applied:
        for name, (qmodule, _) in targets.items():
            qmodule.set_weight_bias(*original[name])
        log.info("bias correction put back: output MSE vs fp32 on %d calibration images %.6g -> %.6g",
                 len(images), mse_before, mse_after)
    return {"applied": applied, "images": len(images), "output_mse_before": float(f"{mse_before:.6g}"),
            "output_mse_after": float(f"{mse_after:.6g}"), "layers": rows}


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


def prepare_qat(model: nn.Module, example: tuple[torch.Tensor, ...], *, backend: str, arch: str,
                activations: str = DEFAULT_ACTIVATIONS) -> nn.Module:
    """A fake-quantized copy of ``model`` in train mode for quantization-aware training, with
    the ``activations`` scheme (``ACTIVATION_SCHEMES``; asymmetric: torch's default QAT qconfig).
    The symmetric scheme's activation fake-quantizers are torch's unfused ``FakeQuantize`` around
    a moving-average observer, since the fused one computes its parameters in its own kernel."""
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        QConfig,
        get_default_qat_qconfig,
        get_default_qat_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    symmetric = _is_symmetric(activations)
    set_engine(backend)
    with quiet():
        mapping = get_default_qat_qconfig_mapping(backend)
        if symmetric:
            fake_quant = FakeQuantize.with_args(observer=_symmetric(MovingAverageMinMaxObserver), quant_min=0,
                                                quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                                reduce_range=False)
            mapping.set_global(QConfig(activation=fake_quant, weight=get_default_qat_qconfig(backend).weight))
    return _prepare(prepare_qat_fx, copy.deepcopy(model).train(), mapping, example, arch)


def freeze_qat(prepared: nn.Module) -> nn.Module:
    """``prepared`` (a QAT model, in place) with its observers stopped: its fake-quantizers keep
    the scales training left. Converting calls each weight's fake-quantizer once more, and a
    moving-average observer still running would move the weight scales by that one call, and the
    converted model and its ONNX export (which reads the scales as they are) would differ."""
    from torch.ao.quantization import disable_observer

    return prepared.apply(disable_observer)


def convert_qat(prepared: nn.Module) -> nn.Module:
    """The int8 model of a quantization-aware trained model (converted in place), with the
    scales training left (``freeze_qat``)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet():
        return convert_fx(freeze_qat(prepared.cpu().eval()))


def layer_table(model: nn.Module) -> list[dict[str, str]]:
    """Every convolution and linear layer with the precision it runs in."""
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.nn.intrinsic import _FusedModule

    rows = []
    fused = set()
    for name, m in model.named_modules():
        if isinstance(m, _FusedModule):  # a float conv + relu kept fp32: named like its int8 form
            fused.add(name)
        if name.rpartition(".")[0] in fused:
            name = name.rpartition(".")[0]
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
