"""The error taxonomy every stage and worker relies on.

QpipeError
 ├── ConfigError      bad input (spec, dataset, checkpoint, credentials): never retried;
 │    └── SpecError   the spec file itself was refused, before anything was enqueued
 ├── StageError       a stage could not finish for a reason tied to its inputs (an unsupported
 │    │               layer, a missing upstream artifact): never retried, recorded with its cause
 │    ├── CorruptArtifact  a stored object does not hash to the sha256 its manifest records (bit
 │    │                    rot, a truncated upload, tampering): never retried as an outage and
 │    │                    never loaded; a cached stage holding one is recomputed when next run
 │    ├── OutOfMemory      the stage ran out of accelerator memory: never retried (the same batch
 │    │                    would not fit); its checkpoints are kept for a rerun to resume from
 │    └── ProcessLost      the stage's process died (OOM killer, segfault) on QPIPE_MAX_DELIVERIES
 │                         deliveries in a row: not delivered again; its checkpoints are kept
 ├── TransientError   the store or broker is unreachable right now: retried with backoff
 │    └── DeviceUnavailable  the stage needs CUDA and this worker has none: retried the same way,
 │                           so another worker (one with a GPU) may take it; failed with the reason
 │                           once the retries are spent
 └── Cancelled        the run was cancelled; the stage stopped cooperatively
"""


class QpipeError(Exception):
    """Base class of every error qpipe raises on purpose."""

    # whether a failed stage keeps its resume checkpoints (and only them) for a rerun
    keeps_checkpoints = False


class ConfigError(QpipeError):
    """The user's input is wrong; the message says what and how to fix it."""


class SpecError(ConfigError):
    """A pipeline spec was refused. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} refused ({len(self.problems)} problem(s)):\n{lines}")


class StageError(QpipeError):
    """A stage failed for a reason that retrying would not change."""


class CorruptArtifact(StageError):
    """A stored object's bytes do not match the sha256 recorded for it; it was not loaded."""

    def __init__(self, uri: str, key: str, expected: str, actual: str, size: int) -> None:
        self.uri, self.key, self.expected, self.actual, self.size = uri, key, expected, actual, size
        super().__init__(f"{uri} is corrupt: its {size} bytes hash to sha256 {actual}, but {expected} was "
                         "recorded; it was not loaded. Rerun: a cached stage with a corrupt output is "
                         "recomputed, and a corrupt source or weights file is uploaded again")


class OutOfMemory(StageError):
    """A stage ran out of accelerator memory; the message names the batch size and the fix."""

    keeps_checkpoints = True


class ProcessLost(StageError):
    """The stage's process died without a word on every one of its last deliveries; the message
    names the signals and what to try. A rerun with more memory resumes from the checkpoints."""

    keeps_checkpoints = True


class TransientError(QpipeError):
    """A dependency (object store, broker) is unreachable; the operation may succeed later."""


class DeviceUnavailable(TransientError):
    """The stage needs a device this worker lacks (finetune.device: cuda without CUDA). A retry
    is a new message on the same queue, which any worker may take: the requeue is bounded by the
    retry count that travels in the message, and the backoff keeps a lone CPU-only worker from
    spinning on it (reject(requeue=True) would put it back at once, and count nothing)."""


class Cancelled(QpipeError):
    """The run was cancelled while this stage was working."""
