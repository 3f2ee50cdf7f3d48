"""The typed config of every stage: what the plan builds, what a task message carries (as JSON)
and what the stage function receives (parsed back, see ``pipeline.stages.execute``).

A config's JSON is part of its stage's content key, so it is a stored format: a field is
serialised under the name and in the form it always had, and an option added after keys existed
(``OPTIONAL``) stays out of the JSON while it holds its default, so keys made before it existed
still match. Nothing here imports torch: the submitting machine plans without it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from pipeline.errors import StageError


class StageConfig(BaseModel):
    """A stage's config. ``OPTIONAL``: fields left out of the JSON while at their default.
    ``UNKEYED``: fields that do not change the stage's result, so they stay out of its key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    UNKEYED: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """The config as it travels in a plan node and is hashed into the stage's key."""
        out = self.model_dump(mode="json")
        for name in self.OPTIONAL:
            if getattr(self, name) == type(self).model_fields[name].default:
                del out[name]
        return out

    def key_fields(self) -> dict[str, Any]:
        """The part of ``to_json()`` that enters the stage's content key."""
        return {k: v for k, v in self.to_json().items() if k not in self.UNKEYED}

    @classmethod
    def parse(cls, data: dict[str, Any]) -> StageConfig:
        """The config of a received plan node; a node that does not fit is a config error of the
        plan, never retried."""
        try:
            return cls.model_validate(data)
        except ValueError as err:
            raise StageError(f"the plan node's config does not fit {cls.__name__}: {err}") from None


class IngestConfig(StageConfig):
    source: dict[str, Any]  # a prepared source description (pipeline.sources.prepare_source)
    val_source: dict[str, Any] | None
    val_fraction: float
    image_size: int
    calib_size: int
    seed: int
    max_image_pixels: int
    max_archive_bytes: int


class FinetuneConfig(StageConfig):
    # mixed precision changes the weights, so it is keyed; fp32 stays out of the JSON, so keys made
    # before the option existed still match
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"precision"})

    arch: str
    weights: dict[str, Any] | None  # a prepared checkpoint or torchvision weights description
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    freeze_backbone: bool
    seed: int
    device: str  # where it trains, not what it computes
    UNKEYED: ClassVar[frozenset[str]] = frozenset({"device"})
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class CalibrateConfig(StageConfig):
    observer: str  # the statistic recorded: minmax, moving_average_minmax or histogram
    backend: str
    arch: str
    seed: int


class ConvertConfig(StageConfig):
    """What decides a static or dynamic int8 model; shared by quantize and its sensitivity parts."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"percentile", "activations"})

    method: Literal["static", "dynamic"]
    observer: str | None  # None for dynamic
    per_channel: bool
    backend: str
    arch: str
    percentile: float | None = None
    activations: Literal["symmetric", "asymmetric"] | None = None  # static: pipeline.quant.ACTIVATION_SCHEMES


class SensitivityConfig(ConvertConfig):
    OPTIONAL: ClassVar[frozenset[str]] = ConvertConfig.OPTIONAL | {"latency"}

    part: int
    parts: int
    latency: bool = False  # also time what keeping each layer fp32 costs (fallback: latency)


ENGINE_FIELDS = ("engine", "preset", "fast_bias_correction", "calibrate_method", "preprocess")


class QuantizeConfig(ConvertConfig):
    OPTIONAL: ClassVar[frozenset[str]] = ConvertConfig.OPTIONAL | {
        "bias_correction", "sensitivity", "fallback", "accuracy_budget", "export_onnx", *ENGINE_FIELDS}

    variant: str
    bias_correction: bool = False
    sensitivity: int | None = None  # the number of sensitivity parts to join
    fallback: Literal["auto", "latency"] | None = None
    accuracy_budget: float | None = None  # with a fallback
    export_onnx: bool = False
    # who quantizes (pipeline.engines): qpipe from the calibration input, or another engine from the
    # fp32 model and the calibration images, with that engine's options (None for the others)
    engine: Literal["qpipe", "nncf", "onnxruntime"] = "qpipe"
    preset: Literal["performance", "mixed"] | None = None  # nncf
    fast_bias_correction: bool | None = None  # nncf
    calibrate_method: Literal["minmax", "entropy", "percentile"] | None = None  # onnxruntime
    preprocess: bool | None = None  # onnxruntime


class QatConfig(StageConfig):
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"export_onnx"})

    variant: str
    arch: str
    backend: str
    epochs: int
    lr: float
    batch_size: int
    momentum: float
    seed: int
    device: str  # where it trains, not what it computes
    UNKEYED: ClassVar[frozenset[str]] = frozenset({"device"})
    export_onnx: bool = False  # also write the int8 model as ONNX QDQ, for ONNX Runtime and OpenVINO


class BenchmarkConfig(StageConfig):
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"runtimes", "engine"})

    variant: str
    method: str  # fp32 or the variant's method
    batch_sizes: list[int]
    threads: int
    warmup: int
    iterations: int
    backend: str
    runtimes: list[str] = []  # the runtimes besides TorchScript that run the variant's ONNX export
    engine: str = "qpipe"  # another engine's model has no TorchScript form: measured on ``runtimes`` alone


class ReportEntry(TypedDict, total=False):
    """One benchmark the report joins: its plan name and method (and engine, when not qpipe); in a
    sweep its arch and set."""

    name: str
    method: str
    engine: str
    arch: str
    set: str | None


class ReportConfig(StageConfig):
    name: str
    accuracy_budget: float
    batch_sizes: list[int]
    variants: list[ReportEntry]
