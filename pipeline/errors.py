"""The error taxonomy every stage and worker relies on.

QpipeError
 ├── ConfigError      bad input (spec, dataset, checkpoint, credentials): never retried;
 │    └── SpecError   the spec file itself was refused, before anything was enqueued
 ├── StageError       a stage could not finish for a reason tied to its inputs (an unsupported
 │                    layer, a missing upstream artifact): never retried, recorded with its cause
 ├── TransientError   the store or broker is unreachable right now: retried with backoff
 └── Cancelled        the run was cancelled; the stage stopped cooperatively
"""


class QpipeError(Exception):
    """Base class of every error qpipe raises on purpose."""


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


class TransientError(QpipeError):
    """A dependency (object store, broker) is unreachable; the operation may succeed later."""


class Cancelled(QpipeError):
    """The run was cancelled while this stage was working."""
