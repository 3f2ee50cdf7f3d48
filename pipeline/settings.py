"""Every ``QPIPE_*`` environment variable, declared once: its type, default, bounds and meaning.

Code reads a knob through :func:`settings`, which builds a fresh :class:`Settings` from the
environment on each call: the CLI and the tests change ``os.environ`` at run time (``qpipe
worker`` hands its store's URI to its pool processes that way), so a cached object would go
stale. Where a value is read once (the Celery app's limits, at import of ``workers.app``), the
caller keeps what it read.

A value that does not parse or is out of bounds is refused as a ``ConfigError`` that names the
variable, the value it holds and the rule, e.g. ``QPIPE_MAX_DELIVERIES (0) must be at least 1``.
Empty variables count as unset.

Credentials (the broker URL, which may hold a password, and the S3 keys) are ``SecretStr``: a
repr, a log line or ``qpipe config`` shows them masked; :func:`secret` unwraps one where it is
used. Torch-free and Celery-free: the submitting machine and the worker's parent import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError

PREFIX = "QPIPE_"
MASK = "**********"


class Settings(BaseSettings):
    """qpipe's knobs; each field ``name`` is read from ``QPIPE_NAME``."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore",
                                      validate_default=True)

    # where things are
    broker_url: SecretStr | None = Field(
        None, description="Redis/Valkey URL of the broker, which also holds results and run status "
        "(redis://[:PASSWORD@]HOST:PORT/DB); --broker overrides it; unset: `qpipe run` starts the embedded default")
    store_uri: str | None = Field(
        None, description="artifact store, file:///DIR or s3://BUCKET/PREFIX; --store overrides it; a worker "
        "serves this store only")
    s3_endpoint: str | None = Field(None, description="host:port of the S3 server of an s3:// store")
    s3_access_key: SecretStr | None = Field(None, description="S3 access key of an s3:// store")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret key of an s3:// store")
    s3_secure: bool = Field(False, description="talk HTTPS to the S3 server (true/false)")
    store_attempts: int = Field(
        6, ge=1, description="tries of each object-store call before it fails as transient (backoff with full "
        "jitter from 0.5 s doubling up to 8 s: about 15 s of patience at 6)")
    home: Path = Field(Path(".qpipe"), description="folder of the embedded default (`qpipe run` without a "
                       "broker): its file store and its Valkey data")
    metrics_dir: Path | None = Field(
        None, description="parent folder of each worker's Prometheus files (default: qpipe-metrics-UID in the "
        "temporary folder)")
    # how stages run (read once, when a worker or client imports the Celery app)
    stage_time_limit: int = Field(6 * 3600, ge=1, description="hard time limit of one stage in seconds; the "
                                  "soft limit, which lets the stage stop cleanly, is 60 s earlier")
    max_retries: int = Field(8, ge=0, description="retries of a stage that failed on a transient error (store "
                             "or broker unreachable, no CUDA on this worker) before it fails")
    retry_backoff_max: int = Field(300, ge=0, description="cap in seconds of the backoff between a stage's "
                                   "retries (exponential with full jitter)")
    lease_interval: float = Field(10.0, gt=0, allow_inf_nan=False, description="seconds between a worker's "
                                  "renewals of the delivery time of the messages it holds")
    visibility_timeout: int = Field(300, ge=1, description="seconds after which a message a dead worker held "
                                    "is delivered again; at least 3x QPIPE_LEASE_INTERVAL")
    restore_interval: int = Field(10, ge=1, description="seconds between a worker's sweeps for messages whose "
                                  "visibility timeout has passed")
    max_deliveries: int = Field(3, ge=1, description="deliveries in a row whose process died (OOM killer, "
                                "segfault) before the stage is failed with the cause instead of run again")
    lock_ttl: int = Field(60, ge=1, description="seconds a stage lock outlives a holder that died (renewed "
                          "every quarter of it while the stage runs)")
    worker_max_memory_kb: int = Field(3 * 1024 * 1024, ge=0, description="a pool process that holds more "
                                      "resident memory (KiB) after a stage is replaced; 0: never")

    @model_validator(mode="after")
    def _leases_outlast_renewals(self) -> Settings:
        if self.visibility_timeout < 3 * self.lease_interval:
            raise ValueError(f"QPIPE_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must be at least 3x "
                             f"QPIPE_LEASE_INTERVAL ({self.lease_interval}s), or a live worker's stage would be "
                             "delivered to a second worker between two renewals")
        return self


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


# what a refused value breaks, worded for a person; other rules fall back to pydantic's message
_RULES = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false (1/0, yes/no)",
}


def _explain(err: ValidationError) -> str:
    problems = []
    for e in err.errors(include_url=False):
        if not e["loc"]:  # a rule across fields: its message names them
            cause = (e.get("ctx") or {}).get("error")
            problems.append(str(cause) if cause is not None else e["msg"])
            continue
        field = str(e["loc"][0])
        info = Settings.model_fields[field]
        rule = _RULES.get(e["type"], e["msg"]).format(**(e.get("ctx") or {}))
        problems.append(f"{env_name(field)} ({e['input']}) {rule}: {info.description} (default {_shown(info.default)})")
    return "; ".join(problems)


def settings(**overrides: Any) -> Settings:
    """The knobs as the environment sets them now (``overrides`` win over it)."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


class Knob(NamedTuple):
    name: str  # QPIPE_...
    value: str  # as shown: credentials masked
    default: str
    description: str


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        scheme, sep, rest = raw.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if sep and at and ":" in userinfo:  # a URL with a password: only the password is secret
            return f"{scheme}://{userinfo.partition(':')[0]}:{MASK}@{host}"
        return MASK
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def knobs(current: Settings | None = None) -> list[Knob]:
    """Every knob with its value (credentials masked), default and description, for ``qpipe config``."""
    current = current or settings()
    return [Knob(env_name(field), _shown(getattr(current, field)), _shown(info.default), info.description or "")
            for field, info in Settings.model_fields.items()]
