"""The pipeline spec: one pydantic model, validated once at the edge (before anything is
enqueued). Workers only re-parse the JSON they are sent.

Every refusal names the field and says how to fix it; see ``load_spec``.

A spec may hold a ``sweep``: several archs and/or named sets of variants, run as one grid (every
variant of every set on every arch) with one report. Without it a spec means what it always did.
"""

from __future__ import annotations

import difflib
import functools
import re
import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.errors import SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The activation observers of method: static (pipeline.quant implements each), declared here once
# (torch-free: the spec, the planner and the engine read it), each with the statistic its
# calibration records: the histogram observers (percentile, mse, entropy) differ only in the range
# they choose from one histogram, at conversion, so they share a calibration.
CALIBRATION_STATISTIC = {"minmax": "minmax", "moving_average_minmax": "moving_average_minmax",
                         "histogram": "histogram", "percentile": "histogram", "mse": "histogram",
                         "entropy": "histogram"}
OBSERVERS = tuple(CALIBRATION_STATISTIC)
Observer = Literal[OBSERVERS]  # type: ignore[valid-type]  # the spec's choices are the table's keys
DEFAULT_PERCENTILE = 99.99
URI_SCHEMES = ("file://", "s3://")
MAX_VARIANTS = 64  # per spec, across every variant set: each is a chain of stages and a benchmark
# A spec file is a few hundred values a few levels deep; these bound what a hostile or broken file
# can cost before it is refused (see _check_yaml_shape).
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32
MAX_SPEC_VALUES = 100_000
YAML_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag) | {"!"}  # plain data only
_SHOWN = reprlib.Repr()  # values in messages are cut short: they may be huge (a 500-digit number, a long list)
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '/' or '..'"
        )
    return value


def _check_arch(value: str) -> str:
    archs = classification_archs()
    if value not in archs:
        close = difflib.get_close_matches(value, archs, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise ValueError(f"unknown arch {value!r}: {hint}")
    return value


def _refuse(field: str, message: str) -> PydanticCustomError:
    """A cross-field refusal, reported at ``field`` (a dotted path) rather than at the model that
    checked it (see ``_explain``)."""
    return PydanticCustomError("spec_field", "{message}", {"field": field, "message": message})


class DataSpec(_Strict):
    source: str = "builtin:digits"
    val_source: str | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_size: int = Field(64, ge=16, le=1024)
    calib_size: int = Field(256, ge=1, le=100_000)
    max_image_pixels: int = Field(
        50_000_000, ge=1, le=1_000_000_000, description="images with more pixels are skipped (decompression bombs)"
    )
    max_archive_bytes: int = Field(
        4 * 1024**3, ge=1, le=1024**4, description="an archive that expands past this is refused"
    )

    @field_validator("source", "val_source")
    @classmethod
    def _source_form(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("is empty: give builtin:digits, a folder, or a file:// or s3:// URI")
        if value.startswith("builtin:") and value != "builtin:digits":
            raise ValueError(f"unknown builtin dataset {value!r}: the only one is builtin:digits")
        if "://" in value and not value.startswith(URI_SCHEMES):
            raise ValueError(f"unsupported URI scheme in {value!r}: use file://, s3:// or a path")
        return value


class ModelSpec(_Strict):
    arch: str = "resnet18"
    weights: str | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return _check_arch(value)

    @model_validator(mode="after")
    def _known_weights(self) -> ModelSpec:
        w = self.weights
        if w is None or w.startswith(URI_SCHEMES) or "/" in w or w.endswith((".pt", ".pth")):
            return self
        names = weight_names(self.arch)
        if w not in names:
            raise ValueError(
                f"weights {w!r} do not exist for {self.arch}: use one of "
                f"{', '.join(names) or '(none)'}, null, or a checkpoint URI (file://, s3://)"
            )
        return self


class FinetuneSpec(_Strict):
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(0.001, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    freeze_backbone: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="on CUDA: bf16 or fp16 autocast (fp16 with a gradient scaler) and channels_last; "
        "weights stay fp32. CUDA only: refused with device: cpu; with device: auto on a worker without CUDA the "
        "stage trains in fp32 and its manifest says why. QAT variants always train in fp32")

    @model_validator(mode="after")
    def _precision_needs_cuda(self) -> FinetuneSpec:
        if self.precision != "fp32" and self.device == "cpu":
            raise _refuse("finetune.precision", f"{self.precision} is mixed precision on CUDA, and finetune.device "
                                                "is cpu: set device: cuda (or auto), or remove precision")
        return self


class _Variant(_Strict):
    """What every variant has. Each method is a class below (``VariantSpec`` is their union, told
    apart by ``method``) holding its own options and rules; an option of another method is refused
    by name, and reads as unset on a variant of this one."""

    METHOD: ClassVar[str]
    # how the plan treats the method: the stage that produces its int8 model, whether it converts
    # from a stored calibration, whether it can be exported as ONNX QDQ for the other runtimes
    PRODUCER: ClassVar[str] = "quantize"
    CALIBRATED: ClassVar[bool] = False
    EXPORTS_ONNX: ClassVar[bool] = False
    ENGINE: ClassVar[str] = "qpipe"  # who quantizes: qpipe itself (torch.ao), or another engine (_EngineVariant)

    name: str
    per_channel: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value == "fp32":
            raise ValueError("'fp32' is the baseline's name: pick another variant name")
        return _check_name(value, "variant name")

    @model_validator(mode="before")
    @classmethod
    def _no_other_methods_options(cls, data: Any) -> Any:
        """Refuse, naming it, an option that only another method uses (set to its unset value, it
        is dropped)."""
        if not isinstance(data, dict):
            return data
        own = cls.model_fields
        name, method = data.get("name"), cls.METHOD
        foreign = {k: v for k, v in data.items() if k in UNSET_OPTIONS | ENGINE_OPTIONS and k not in own}
        given = {k for k, v in foreign.items() if v is not None and v is not False and v != "none"
                 and not (k == "engine" and v == "qpipe")}
        _refuse_other_engines_options(cls, name, given)
        if "observer" in given:
            raise ValueError(f"observer is only used by method: static (variant {name!r} is {method}): remove it")
        if "activations" in given:
            raise ValueError(f"activations is an option of method: static (variant {name!r} is {method}; QAT "
                             "trains with the symmetric scheme): remove it")
        if "percentile" in given:
            raise ValueError(f"percentile only applies to observer: percentile (variant {name!r} uses no observer): "
                             "remove it or set observer: percentile")
        if "bias_correction" in given:
            raise ValueError(f"bias_correction only applies to method: static (variant {name!r} is {method}): "
                             "remove it")
        for option in ("sensitivity", "fallback"):
            if option in given:
                raise ValueError(f"{option} only applies to method: static (variant {name!r} is {method}): "
                                 "remove it, or add a static variant with it")
        extra = [k for k in ("epochs", "lr", "batch_size") if k in given]
        if extra:
            raise ValueError(f"{', '.join(extra)} only apply to method: qat (variant {name!r} is {method}): "
                             "remove them")
        return {k: v for k, v in data.items() if k not in foreign and not (k == "engine" and v is None)}

    def __getattr__(self, name: str) -> Any:
        # another method's option reads as unset (a dynamic variant's observer is None); so does
        # another engine's (a dynamic variant's engine is qpipe, its preset None)
        if name in UNSET_OPTIONS:
            return UNSET_OPTIONS[name]
        if name in ENGINE_OPTIONS:
            return ENGINE_OPTIONS[name]
        return super().__getattr__(name)  # type: ignore[misc]

    def engine_options(self) -> dict[str, Any]:
        """The engine and its options as the quantize stage's config takes them: nothing for
        qpipe's own engine, so its configs (and keys) are what they were before engines existed."""
        return {}

    def measured_on(self, runtimes: list[str]) -> list[str]:
        """Which of ``runtimes`` (benchmark.runtimes besides TorchScript) the variant's model is
        measured on besides TorchScript: all of them where it is exported as ONNX QDQ."""
        return list(runtimes) if self.EXPORTS_ONNX else []

    @model_serializer(mode="wrap")
    def _every_option(self, handler: Any) -> dict[str, Any]:
        # dumped with every method's options (unset where they are not its own), as when one class
        # held them all: the spec's digest (pipeline.runner.spec_digest) stays what it was
        out = {**UNSET_OPTIONS, **handler(self)}
        if out.get("engine") == "qpipe":  # qpipe's own engine dumps as it did before engines existed
            del out["engine"]
        if out.get("activations") == "symmetric":  # and the default scheme as before it was an option
            del out["activations"]
        return out


# every method-specific option, with the value it reads as on a variant of another method
UNSET_OPTIONS: dict[str, Any] = {"observer": None, "percentile": None, "bias_correction": False,
                                 "sensitivity": False, "fallback": "none", "epochs": None, "lr": None,
                                 "batch_size": None, "activations": "symmetric"}
# the engine of a static variant and each engine's options, with the value they read as on a variant
# that has none; dumped only by the variants that have them (engines came after spec digests)
ENGINE_OPTIONS: dict[str, Any] = {"engine": "qpipe", "preset": None, "fast_bias_correction": None,
                                  "calibrate_method": None, "preprocess": None}


def _refuse_other_engines_options(cls: type[_Variant], name: Any, given: set[str]) -> None:
    """Raise ValueError naming an option ``given`` to a variant of ``cls`` that belongs to
    another engine: qpipe's calibration options on another engine's variant, one engine's
    options on another's, or an engine on a method other than static."""
    engine = cls.ENGINE
    own_calibration = sorted(given & set(StaticVariant.model_fields)) if engine != "qpipe" else []
    if own_calibration:
        one = len(own_calibration) == 1
        raise ValueError(f"{', '.join(own_calibration)} {'is an option' if one else 'are options'} of qpipe's own "
                         f"calibration, and variant {name!r} uses engine: {engine}, which calibrates the model "
                         f"itself: remove {'it' if one else 'them'}, or remove engine to quantize with qpipe")
    for option in sorted(given & (ENGINE_OPTIONS.keys() - {"engine"})):
        owner = ENGINE_OF_OPTION[option]
        if cls.METHOD != "static":
            raise ValueError(f"{option} is an option of engine: {owner} with method: static (variant {name!r} is "
                             f"{cls.METHOD}): remove it")
        fix = f"set engine: {owner}, or remove it" if engine == "qpipe" else "remove it"
        raise ValueError(f"{option} is an option of engine: {owner} (variant {name!r} uses engine: {engine}): {fix}")
    if "engine" in given:
        raise ValueError(f"engine only applies to method: static (variant {name!r} is {cls.METHOD}): remove it, "
                         "or set method: static")


class _PerChannelOnly(_Variant):
    @model_validator(mode="after")
    def _per_channel(self) -> _PerChannelOnly:
        if not self.per_channel:
            raise ValueError(f"{self.METHOD} quantization uses per-channel weights: remove per_channel "
                             "(per-tensor weights are a method: static option)")
        return self


class StaticVariant(_Variant):
    """Post-training static quantization: activation ranges from a stored calibration."""

    METHOD: ClassVar[str] = "static"
    CALIBRATED: ClassVar[bool] = True
    EXPORTS_ONNX: ClassVar[bool] = True

    method: Literal["static"]
    engine: Literal["qpipe"] = Field(
        "qpipe", description="static only: who quantizes: qpipe (torch.ao, from a stored calibration), nncf or "
        "onnxruntime (that engine's post-training quantization, with its own options)")
    observer: Observer = "histogram"
    activations: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="static only: symmetric (NNCF's performance preset: zero point 0, int8 for signed "
        "tensors; what OpenVINO's fastest kernels read) or asymmetric (torch's x86 default: any zero point, 7 bits)")
    percentile: float | None = Field(
        None, gt=50.0, le=100.0, description="observer: percentile clips activations to this percentile "
        "(and the bottom to 100 minus it); 99.99 by default")
    bias_correction: bool = Field(
        False, description="static only: after conversion, shift each int8 conv/linear bias by its mean "
        "output error against fp32 on the calibration images")
    sensitivity: bool = Field(
        False, description="static only: measure every layer's effect on top-1 and SQNR (that layer alone in "
        "int8, and all but it), split over quantize.sensitivity_parts tasks; the report ranks the layers")
    fallback: Literal["none", "auto", "latency"] = Field(
        "none", description="static only: auto keeps the most sensitive layers fp32, fewest first, until the "
        "top-1 drop is within benchmark.accuracy_budget (implies sensitivity); latency does the same in the "
        "order of top-1 recovered per millisecond each layer costs in fp32, measured per layer")

    @model_validator(mode="before")
    @classmethod
    def _default_observer(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("observer", 0) is None:  # observer: null means the default
            data = {k: v for k, v in data.items() if k != "observer"}
        return data

    @model_validator(mode="after")
    def _options_fit(self) -> StaticVariant:
        if self.percentile is not None and self.observer != "percentile":
            raise ValueError(
                f"percentile only applies to observer: percentile (variant {self.name!r} uses "
                f"{self.observer}): remove it or set observer: percentile"
            )
        if self.observer == "percentile" and self.percentile is None:
            self.percentile = DEFAULT_PERCENTILE
        if self.fallback in ("auto", "latency"):
            self.sensitivity = True
        return self


class DynamicVariant(_PerChannelOnly):
    """Dynamic quantization: int8 weights, activations quantized on the fly."""

    METHOD: ClassVar[str] = "dynamic"

    method: Literal["dynamic"]


class QatVariant(_PerChannelOnly):
    """Quantization-aware training, from the fine-tuned model."""

    METHOD: ClassVar[str] = "qat"
    PRODUCER: ClassVar[str] = "qat"
    EXPORTS_ONNX: ClassVar[bool] = True  # the trained model exports like a calibrated one

    method: Literal["qat"]
    epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(1e-4, gt=0.0, le=10.0)
    batch_size: int | None = Field(None, ge=1, le=4096)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):  # epochs: null or lr: null mean the default, as they always did
            data = {k: v for k, v in data.items() if not (k in ("epochs", "lr") and v is None)}
        return data


class _EngineVariant(_Variant):
    """Post-training static quantization by another engine (``pipeline.engines``): its quantize
    node exports the fine-tuned model as fp32 ONNX and hands it, with the ingest's calibration
    images, to the engine, which calibrates and quantizes by its own rules. Its model has no
    TorchScript form: it is measured on the runtimes of ``RUNS_ON`` that benchmark.runtimes lists."""

    METHOD: ClassVar[str] = "static"
    RUNS_ON: ClassVar[tuple[str, ...]]

    method: Literal["static"]

    def engine_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ENGINE_OPTIONS if k in type(self).model_fields}

    def measured_on(self, runtimes: list[str]) -> list[str]:
        return [r for r in runtimes if r in self.RUNS_ON]


class NncfVariant(_EngineVariant):
    """engine: nncf: NNCF's post-training quantization of the OpenVINO model; its model is
    OpenVINO IR, run by OpenVINO."""

    ENGINE: ClassVar[str] = "nncf"
    RUNS_ON: ClassVar[tuple[str, ...]] = ("openvino",)

    engine: Literal["nncf"]
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="engine: nncf: NNCF's preset: performance (symmetric activations and weights) "
        "or mixed (asymmetric activations)")
    fast_bias_correction: bool = Field(
        True, description="engine: nncf: NNCF's fast bias correction (its default); false runs its full "
        "BiasCorrection algorithm (slower)")

    @model_validator(mode="after")
    def _per_channel(self) -> NncfVariant:
        if not self.per_channel:
            raise ValueError("engine: nncf quantizes weights per channel (both presets): remove per_channel")
        return self


class OnnxRuntimeVariant(_EngineVariant):
    """engine: onnxruntime: ONNX Runtime's static quantization to a QDQ ONNX model; run by ONNX
    Runtime and by OpenVINO."""

    ENGINE: ClassVar[str] = "onnxruntime"
    RUNS_ON: ClassVar[tuple[str, ...]] = ("onnxruntime", "openvino")

    engine: Literal["onnxruntime"]
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="engine: onnxruntime: its activation calibration (CalibrationMethod)")
    preprocess: bool = Field(
        True, description="engine: onnxruntime: run its quant_pre_process (shape inference, graph optimisation) "
        "before quantizing, as its documentation recommends")


METHODS: dict[str, type[_Variant]] = {c.METHOD: c for c in (StaticVariant, DynamicVariant, QatVariant)}
ENGINES: dict[str, type[_Variant]] = {c.ENGINE: c for c in (StaticVariant, NncfVariant, OnnxRuntimeVariant)}
ENGINE_OF_OPTION = {k: c.ENGINE for c in ENGINES.values() for k in c.model_fields
                    if k in ENGINE_OPTIONS and k != "engine"}
# a variant's class by its tag: its method, and for a static variant quantized by another engine
# method:engine (pydantic shows the tag in error locations; _shown_loc drops it)
VARIANT_KINDS: dict[str, type[_Variant]] = {**METHODS, **{f"static:{e}": c for e, c in ENGINES.items() if e != "qpipe"}}


def _variant_kind(data: Any) -> str | None:
    """The tag of the variant class ``data`` (a dict or a variant) is parsed with: its method,
    or ``static:<engine>`` for a static variant with an engine other than qpipe."""
    get = data.get if isinstance(data, dict) else lambda key: getattr(data, key, None)
    method, engine = get("method"), get("engine")
    if method is not None and not isinstance(method, str):
        method = str(method)
    if method != "static" or engine is None or engine == "qpipe":
        return method
    return f"static:{engine}"


VariantSpec = Annotated[
    typing.Union[tuple(Annotated[c, Tag(t)] for t, c in VARIANT_KINDS.items())],  # noqa: UP007 - built from the table
    Discriminator(_variant_kind)]


class QuantizeSpec(_Strict):
    backend: Literal["x86", "qnnpack"] = "x86"
    # required, unless sweep.variant_sets lists the variants instead (checked by PipelineSpec)
    variants: list[VariantSpec] | None = Field(None, min_length=1, max_length=MAX_VARIANTS)
    sensitivity_parts: int = Field(
        4, ge=1, le=256, description="tasks each sensitivity analysis is split into (layers dealt round-robin): "
        "with N cpu workers, N or more parts finish about N times sooner than one")

    @field_validator("variants")
    @classmethod
    def _unique(cls, value: list[VariantSpec] | None) -> list[VariantSpec] | None:
        seen: set[str] = set()
        for v in value or []:
            if v.name in seen:
                raise ValueError(f"variant name {v.name!r} is used twice: names must be unique")
            seen.add(v.name)
        return value


class SweepSpec(_Strict):
    """A grid: every variant of every set, on every arch. ``archs`` defaults to [model.arch] and
    ``variant_sets`` to quantize.variants (as one set without a name); give at least one."""
    archs: list[str] | None = Field(None, min_length=1, max_length=32)
    variant_sets: dict[str, list[VariantSpec]] | None = Field(None, min_length=1)

    @field_validator("archs")
    @classmethod
    def _archs(cls, value: list[str] | None) -> list[str] | None:
        for i, arch in enumerate(value or []):
            _check_arch(arch)
            if arch in value[:i]:
                raise ValueError(f"arch {arch!r} is listed twice: list each arch once")
        return value

    @field_validator("variant_sets")
    @classmethod
    def _sets(cls, value: dict[str, list[VariantSpec]] | None) -> dict[str, list[VariantSpec]] | None:
        # a name is a row of the report and a node of the plan per arch: one definition per name, even
        # when two sets would list the same variant (put it in one set; every arch measures it once)
        owner: dict[str, str] = {}
        total = sum(len(variants) for variants in (value or {}).values())
        if total > MAX_VARIANTS:
            raise ValueError(f"the variant sets list {total} variants, over the limit of {MAX_VARIANTS}: "
                             "split the sweep into several specs")
        for set_name, variants in (value or {}).items():
            _check_name(set_name, "variant set name")
            if not variants:
                raise ValueError(f"variant set {set_name!r} is empty: list at least one variant or remove the set")
            for v in variants:
                if v.name in owner:
                    where = f"in set {set_name!r}" if owner[v.name] == set_name else \
                        f"in sets {owner[v.name]!r} and {set_name!r}"
                    raise ValueError(f"variant name {v.name!r} is used twice ({where}): names must be unique across "
                                     "all variant sets; list a variant in one set only")
                owner[v.name] = set_name
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> SweepSpec:
        if self.archs is None and self.variant_sets is None:
            raise ValueError("an empty sweep: give archs, variant_sets or both, or remove sweep")
        return self


class BenchmarkSpec(_Strict):
    batch_sizes: list[int] = Field([1, 32], min_length=1, max_length=16)
    threads: int = Field(1, ge=1, le=256)
    accuracy_budget: float = Field(0.01, ge=0.0, le=1.0)
    warmup: int = Field(3, ge=0, le=1000)
    iterations: int = Field(20, ge=1, le=100_000)
    runtimes: list[Literal["torchscript", "onnxruntime", "openvino"]] = Field(
        ["torchscript", "onnxruntime", "openvino"],
        description="where each static variant is measured: its TorchScript file in PyTorch, and its ONNX QDQ "
        "export on ONNX Runtime and on OpenVINO (optional extras: skipped, with the reason, where missing); "
        "the report picks the fastest within the accuracy budget for each batch size")

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, value: list[str]) -> list[str]:
        if "torchscript" not in value:
            raise ValueError("torchscript is the reference form every variant is measured in: keep it in the list")
        if len(set(value)) != len(value):
            raise ValueError("runtimes must be unique")
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(b < 1 or b > 4096 for b in value):
            raise ValueError("batch sizes must be between 1 and 4096")
        if len(set(value)) != len(value):
            raise ValueError("batch sizes must be unique")
        return sorted(value)


class PipelineSpec(_Strict):
    name: str
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    # required, unless sweep.variant_sets lists the variants (checked below)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    sweep: SweepSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "name")

    @model_validator(mode="before")
    @classmethod
    def _arch_from_sweep(cls, data: Any) -> Any:
        """sweep.archs replaces model.arch: the first arch fills it, so that model.weights is
        checked against the arch it will be loaded into."""
        sweep = data.get("sweep") if isinstance(data, dict) else None
        archs = sweep.get("archs") if isinstance(sweep, dict) else None
        model = data.get("model", {}) if isinstance(data, dict) else None
        if isinstance(archs, list) and archs and archs[0] in classification_archs() and isinstance(model, dict) \
                and "arch" not in model:  # an unknown arch is sweep.archs' error, not model.arch's
            data = {**data, "model": {**model, "arch": archs[0]}}
        return data

    @model_validator(mode="after")
    def _sweep_fits(self) -> PipelineSpec:
        sets = self.sweep.variant_sets if self.sweep else None
        if sets is None and self.quantize.variants is None:
            field = "quantize.variants" if "quantize" in self.model_fields_set else "quantize"
            raise _refuse(field, "required field is missing: add it")
        if sets is not None and self.quantize.variants is not None:
            raise _refuse("quantize.variants", "sweep.variant_sets lists this sweep's variants: move these "
                                               "into a set there, or remove sweep.variant_sets")
        archs = self.archs()
        if self.model.arch != archs[0]:
            raise _refuse("model.arch", f"{self.model.arch!r} is not sweep.archs[0] ({archs[0]!r}): sweep.archs "
                                        "replaces model.arch, so remove model.arch or list it first in sweep.archs")
        if len(archs) > 1 and self.model.weights is not None:
            raise _refuse("model.weights", f"{self.model.weights!r} fits one arch, and the sweep has {len(archs)} "
                                           f"({', '.join(archs)}): set model.weights: null (each arch starts from "
                                           "random weights), or sweep one arch")
        return self

    @model_validator(mode="after")
    def _engines_have_runtimes(self) -> PipelineSpec:
        """A variant of another engine is measured only on the runtimes its model runs on."""
        for set_name, variants in self.variant_sets().items():
            where = "quantize.variants" if set_name is None else f"sweep.variant_sets.{set_name}"
            for i, v in enumerate(variants):
                if isinstance(v, _EngineVariant) and not v.measured_on(self.benchmark.runtimes):
                    raise _refuse(f"{where}.{i}.engine", f"engine {v.ENGINE}'s model runs on "
                                  f"{' or '.join(v.RUNS_ON)} only, and benchmark.runtimes lists "
                                  f"{', '.join(self.benchmark.runtimes)}: add {v.RUNS_ON[0]} to benchmark.runtimes")
        return self

    def archs(self) -> list[str]:
        """The archs this spec trains: sweep.archs, or model.arch."""
        return list(self.sweep.archs) if self.sweep and self.sweep.archs else [self.model.arch]

    def variant_sets(self) -> dict[str | None, list[VariantSpec]]:
        """The variants by set: sweep.variant_sets, or quantize.variants as one set named None."""
        if self.sweep and self.sweep.variant_sets:
            return dict(self.sweep.variant_sets)
        return {None: list(self.quantize.variants or [])}

    def variants(self) -> list[VariantSpec]:
        """Every variant of every set, in the spec's order."""
        return [v for vs in self.variant_sets().values() for v in vs]

    def static_variants(self) -> list[StaticVariant]:
        return [v for v in self.variants() if isinstance(v, StaticVariant)]


@functools.cache
def classification_archs() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def weight_names(arch: str) -> list[str]:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        return []
    return ["DEFAULT", *[w.name for w in enum]]


def _resolve_path(value: str | None, base: Path, *, bare_word_is_name: bool = False) -> str | None:
    """Make a relative local path absolute against the spec file's folder. With
    ``bare_word_is_name`` (model.weights), a bare word that is no file there is kept as a name."""
    if value is None or value.startswith("builtin:") or "://" in value:
        return value
    if bare_word_is_name and "/" not in value and not value.endswith((".pt", ".pth")):
        if not (base / value).exists():
            return value  # a torchvision weights name such as IMAGENET1K_V1
    return str((base / value).expanduser().resolve())


def _leaf_field(loc: tuple) -> tuple[str, Any] | None:
    """The field an error location ends at, with its pydantic FieldInfo (list indexes, the keys
    of dict-valued fields, such as a variant set's name, and a variant's method tag are stepped
    over)."""
    model: type[BaseModel] | dict[str, type[BaseModel]] | None = PipelineSpec
    found = None
    key_next = False
    for part in loc:
        if isinstance(part, int) or key_next:
            key_next = False
            continue
        if isinstance(model, dict):  # a variant: its method's class
            model = model.get(part)
            continue
        if model is None or part not in model.model_fields:
            return None
        found = (part, model.model_fields[part])
        model, key_next = _inside(found[1].annotation)
    return found


def _inside(annotation: Any) -> tuple[type[BaseModel] | dict[str, type[BaseModel]] | None, bool]:
    """The spec model an annotation holds (through Optional, list and dict; a variant's classes
    by method), and whether a dict is crossed on the way (its keys then appear in error
    locations)."""
    if annotation == VariantSpec:
        return dict(VARIANT_KINDS), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    crossed = typing.get_origin(annotation) is dict
    for arg in typing.get_args(annotation):
        model, inner = _inside(arg)
        if model is not None:
            return model, crossed or inner
    return None, False


def _allowed_range(loc: tuple, path: str) -> str:
    """': allowed range: 1 <= finetune.epochs <= 1000', from the field's declared bounds."""
    leaf = _leaf_field(loc)
    if leaf is None:
        return ""
    low = high = ""
    for c in leaf[1].metadata:
        if getattr(c, "ge", None) is not None:
            low = f"{c.ge} <= "
        elif getattr(c, "gt", None) is not None:
            low = f"{c.gt} < "
        elif getattr(c, "le", None) is not None:
            high = f" <= {c.le}"
        elif getattr(c, "lt", None) is not None:
            high = f" < {c.lt}"
    return f": allowed range: {low}{path}{high}" if low or high else ""


BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"})


def _shown_loc(loc: tuple) -> tuple:
    """An error location as the spec reads: without the variant's tag pydantic inserts after its
    index (``quantize.variants.1.dynamic.observer`` is ``quantize.variants.1.observer``)."""
    return tuple(p for i, p in enumerate(loc) if not (p in VARIANT_KINDS and i and isinstance(loc[i - 1], int)))


def _explain(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in _shown_loc(e["loc"])) or "(top level)"
        if e["type"] == "union_tag_invalid" and str(e["ctx"]["tag"]).startswith("static:"):  # its engine
            problems.append(f"{loc}.engine: Input should be {_SHOWN.repr(list(ENGINES))[1:-1]} "
                            f"(got {_SHOWN.repr(str(e['ctx']['tag']).removeprefix('static:'))})")
        elif e["type"] == "union_tag_invalid":  # a variant's method
            problems.append(f"{loc}.method: Input should be {_SHOWN.repr(list(METHODS))[1:-1]} "
                            f"(got {_SHOWN.repr(e['ctx']['tag'])})")
        elif e["type"] == "union_tag_not_found":
            problems.append(f"{loc}.method: required field is missing: add it")
        elif e["type"] == "spec_field":  # a cross-field check names its field (see _refuse)
            problems.append(f"{e['ctx']['field']}: {e['ctx']['message']}")
        elif e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in _shown_loc(e["loc"])[:-1]) or "the top level"
            problems.append(f"{loc}: unknown key in {parent}: remove it or check its spelling")
        elif e["type"] == "missing":
            problems.append(f"{loc}: required field is missing: add it")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            fix = _allowed_range(e["loc"], loc) if e["type"] in BOUND_ERRORS else ""
            problems.append(f"{loc}: {msg} (got {_SHOWN.repr(e.get('input'))}){fix}")
    return problems


def parse_spec(data: Any, *, base_dir: str | Path | None = None, source: str = "spec") -> PipelineSpec:
    """Validate a spec given as a dict (or an existing PipelineSpec).

    Relative local paths in ``data.source``, ``data.val_source`` and ``model.weights`` resolve
    against ``base_dir`` (the spec file's folder; the current folder if None).
    """
    if isinstance(data, PipelineSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError([f"the spec must be a mapping of keys to values, got {type(data).__name__}"], source)
    base = Path(base_dir or ".").resolve()
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_explain(err), source) from None
    spec.data.source = _resolve_path(spec.data.source, base)  # type: ignore[assignment]
    spec.data.val_source = _resolve_path(spec.data.val_source, base)
    spec.model.weights = _resolve_path(spec.model.weights, base, bare_word_is_name=True)
    return spec


def _check_yaml_shape(text: str) -> None:
    """Refuse, before anything is built from it, a YAML text that is not plain data of a
    bounded size. Raises ValueError saying what is wrong.

    Aliases let a few lines stand for billions of values (the "billion laughs": each anchor a
    list of nine aliases of the one before). The YAML loader shares one object per anchor, but
    everything that then walks the spec (validation, its error messages, JSON dumps) sees the
    whole expansion. So the parser's events are read once, and each node's expanded size is
    counted as it closes (an alias counts as the node it names), refusing past MAX_SPEC_VALUES;
    the work is linear in the text, whatever it would expand to. Nesting is bounded too (the
    loader recurses per level, and its scanner slows down with the flow depth), and so are tags:
    a spec is mappings, lists and scalars, never an object of some class (``!!python/...``).
    """
    sizes: dict[str, int] = {}  # expanded size of each anchored node, once closed
    open_nodes: list[list] = [[None, 0]]  # [anchor, expanded size] of each open collection; the stream
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in YAML_TAGS:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise ValueError(f"line {event.start_mark.line + 1}: the tag {shown} is not allowed: a spec holds plain "
                             "values (mappings, lists, strings, numbers, booleans): remove the tag")
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) > MAX_SPEC_DEPTH + 1:
                raise ValueError(f"line {event.start_mark.line + 1}: nested more than {MAX_SPEC_DEPTH} levels deep "
                                 "(a spec needs five): the file is not a spec")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_nodes.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                if any(a == event.anchor for a, _ in open_nodes):
                    raise ValueError(f"line {event.start_mark.line + 1}: the alias *{event.anchor} refers to a "
                                     "node that holds it (a loop): write the values out instead")
                continue  # an undefined alias: the loader reports it
            anchor, size = None, sizes[event.anchor]
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        open_nodes[-1][1] += size
        if open_nodes[-1][1] > MAX_SPEC_VALUES:
            raise ValueError(f"line {event.start_mark.line + 1}: the file expands to over {MAX_SPEC_VALUES} values "
                             "through its aliases (*name): a spec holds a few hundred; write the values out "
                             "instead of nesting aliases")


def load_spec(spec: str | Path | dict | PipelineSpec) -> PipelineSpec:
    """Load and validate a spec from a YAML path, a dict or a PipelineSpec."""
    if isinstance(spec, (dict, PipelineSpec)):
        return parse_spec(spec)
    path = Path(spec)
    if not path.is_file():
        raise SpecError([f"no spec file at {path}: check the path"], str(path))
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError([f"the file is {size} bytes, over the limit of {MAX_SPEC_BYTES} for a spec (a spec is a "
                         "few KB): check that this is the spec file"], str(path))
    try:
        text = path.read_text(encoding="utf-8")
        _check_yaml_shape(text)
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError([f"not valid YAML: {err}"], str(path)) from None
    except ValueError as err:
        raise SpecError([f"refused YAML: {err}"], str(path)) from None
    return parse_spec(data, base_dir=path.parent, source=str(path))


def spec_digest(spec: PipelineSpec) -> str:
    """The digest of a spec as every run records it (``spec_sha256``)."""
    from pipeline.hashing import canonical_json, sha256_bytes

    dump = spec.model_dump(mode="json")
    if dump.get("sweep") is None:  # a spec without a sweep keeps the digest it had before sweeps existed
        dump.pop("sweep", None)
    return sha256_bytes(canonical_json(dump).encode())
