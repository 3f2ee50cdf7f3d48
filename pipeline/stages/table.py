"""The stage table: every stage declared once, with its version, queue, role, config type and
function. Worker routing (``workers.app``), metrics labels (``workers.metrics``), planning
(``pipeline.plan``) and execution (``pipeline.stages.execute``) all read it.

Nothing here imports torch: a stage's function is named by its dotted path and imported on first
use, in the process that runs it, so the submitting machine and a worker's prefork parent can
route and plan without loading any model code.

A stage's role says how the run treats it, so that rules key on the role rather than on a name:
- ``step``: content-addressed (its key is a hash of name, version, config and input digests; a
  stored result is reused), and runs only when every input exists.
- ``join``: joins whatever its inputs produced: runs every time (outputs under ``runs/{run_id}/``),
  with whichever inputs exist, and ends the run (the report).

Adding a stage: a module under ``pipeline/stages/`` with its function, a config class in
``pipeline.stages.configs``, and one line in ``STAGES``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import StageError
from pipeline.stages.configs import (
    BenchmarkConfig,
    CalibrateConfig,
    FinetuneConfig,
    IngestConfig,
    QatConfig,
    QuantizeConfig,
    ReportConfig,
    SensitivityConfig,
    StageConfig,
)

if TYPE_CHECKING:
    from pipeline.stages import StageContext

QUEUES = ("cpu", "gpu")
Role = Literal["step", "join"]
StageFn = Callable[["StageContext", Any, dict[str, dict]], dict]


@dataclass(frozen=True)
class StageDef:
    name: str
    version: int  # part of the key: bump it when the stage's output changes for the same inputs
    queue: Literal["cpu", "gpu"]
    config: type[StageConfig]
    function: str  # "module:attribute", imported on first use
    role: Role = "step"

    @property
    def cached(self) -> bool:
        """Content-addressed: a stored result is reused; outputs under ``stages/{name}/{key}/``."""
        return self.role == "step"

    @property
    def partial_inputs(self) -> bool:
        """Runs with whichever inputs exist (the others failed)."""
        return self.role == "join"

    @property
    def fn(self) -> StageFn:
        return load_function(self.function)


@functools.cache
def load_function(path: str) -> StageFn:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def declare(*defs: StageDef) -> dict[str, StageDef]:
    """The table of ``defs`` by name; a duplicate name, an unknown queue or role, or a second join
    stage is refused."""
    table: dict[str, StageDef] = {}
    for d in defs:
        if d.name in table:
            raise ValueError(f"stage {d.name!r} is declared twice")
        if d.queue not in QUEUES:
            raise ValueError(f"stage {d.name!r}: queue must be cpu or gpu, not {d.queue!r}")
        if d.role not in ("step", "join"):
            raise ValueError(f"stage {d.name!r}: role must be step or join, not {d.role!r}")
        if not (isinstance(d.config, type) and issubclass(d.config, StageConfig)):
            raise ValueError(f"stage {d.name!r}: config must be a StageConfig class, not {d.config!r}")
        table[d.name] = d
    if sum(d.role == "join" for d in table.values()) > 1:
        raise ValueError("a plan ends in one join stage: declare one stage with role join")
    return table


STAGES: dict[str, StageDef] = declare(
    StageDef("ingest", 1, "cpu", IngestConfig, "pipeline.stages.ingest:ingest"),
    StageDef("finetune", 1, "gpu", FinetuneConfig, "pipeline.stages.finetune:finetune"),
    StageDef("calibrate", 2, "cpu", CalibrateConfig, "pipeline.stages.calibrate:calibrate"),
    StageDef("sensitivity", 2, "cpu", SensitivityConfig, "pipeline.stages.sensitivity:sensitivity"),
    StageDef("quantize", 2, "cpu", QuantizeConfig, "pipeline.stages.quantize:quantize"),
    StageDef("qat", 2, "gpu", QatConfig, "pipeline.stages.qat:qat"),
    StageDef("benchmark", 4, "cpu", BenchmarkConfig, "pipeline.stages.benchmark:benchmark"),
    StageDef("report", 2, "cpu", ReportConfig, "pipeline.stages.report:report", role="join"),
)
JOIN = next(d.name for d in STAGES.values() if d.role == "join")  # the stage that ends every run


def stage_def(name: str) -> StageDef:
    try:
        return STAGES[name]
    except KeyError:
        raise StageError(f"unknown stage {name!r}") from None


def is_join(name: str) -> bool:
    """Whether stage ``name`` joins a run's results (see the module docstring); unknown: False."""
    d = STAGES.get(name)
    return d is not None and d.role == "join"


def load_all() -> dict[str, StageDef]:
    """Import every stage's function now (a worker's parent does, so that its pool processes
    start with them loaded) and return the table."""
    for d in STAGES.values():
        load_function(d.function)
    return STAGES
