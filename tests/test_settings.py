"""The QPIPE_* knobs (pipeline/settings.py): their defaults, the environment read afresh on each
call, refusals that name the variable, its value and the rule, ``qpipe config`` with credentials
masked, and the object store's retries that QPIPE_STORE_ATTEMPTS bounds."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, TransientError
from pipeline.settings import MASK, Settings, env_name, settings

ROOT = Path(__file__).resolve().parent.parent
# the values the code used before the knobs were declared in one place
DEFAULTS = {"broker_url": None, "store_uri": None, "s3_endpoint": None, "s3_access_key": None, "s3_secret_key": None,
            "s3_secure": False, "store_attempts": 6, "home": Path(".qpipe"), "metrics_dir": None,
            "stage_time_limit": 21600, "max_retries": 8, "retry_backoff_max": 300, "lease_interval": 10.0,
            "visibility_timeout": 300, "restore_interval": 10, "max_deliveries": 3, "lock_ttl": 60,
            "worker_max_memory_kb": 3 * 1024 * 1024}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("QPIPE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_are_the_documented_ones(clean_env):
    assert settings().model_dump() == DEFAULTS
    for field, info in Settings.model_fields.items():
        assert info.description and len(info.description) > 20, f"{env_name(field)} has no description"


def test_the_environment_is_read_on_each_call(clean_env):
    clean_env.setenv("QPIPE_STORE_ATTEMPTS", "2")
    clean_env.setenv("QPIPE_LEASE_INTERVAL", "2.5")
    clean_env.setenv("QPIPE_S3_SECURE", "YES")
    clean_env.setenv("QPIPE_HOME", "")  # empty counts as unset
    first = settings()
    assert (first.store_attempts, first.lease_interval, first.s3_secure, first.home) == (2, 2.5, True, Path(".qpipe"))
    clean_env.setenv("QPIPE_STORE_ATTEMPTS", "5")  # what `qpipe worker` and the tests do at run time
    assert settings().store_attempts == 5 and first.store_attempts == 2


@pytest.mark.parametrize("name, value, told", [
    ("QPIPE_MAX_DELIVERIES", "0", "QPIPE_MAX_DELIVERIES (0) must be at least 1: deliveries in a row"),
    ("QPIPE_LOCK_TTL", "abc", "QPIPE_LOCK_TTL (abc) must be a whole number: seconds a stage lock"),
    ("QPIPE_LEASE_INTERVAL", "0", "QPIPE_LEASE_INTERVAL (0) must be more than 0"),
    ("QPIPE_LEASE_INTERVAL", "nan", "QPIPE_LEASE_INTERVAL (nan) must be a finite number"),
    ("QPIPE_STORE_ATTEMPTS", "-1", "QPIPE_STORE_ATTEMPTS (-1) must be at least 1"),
    ("QPIPE_S3_SECURE", "maybe", "QPIPE_S3_SECURE (maybe) must be true or false"),
    ("QPIPE_VISIBILITY_TIMEOUT", "20", "QPIPE_VISIBILITY_TIMEOUT (20s) must be at least 3x QPIPE_LEASE_INTERVAL "
                                       "(10.0s)"),
])
def test_a_bad_value_is_refused_naming_the_variable_its_value_and_the_rule(clean_env, name, value, told):
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        settings()
    assert told in str(refused.value)


def _qpipe_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("QPIPE_")}
    return subprocess.run([sys.executable, "-m", "workers.cli", "config"], capture_output=True, text=True, timeout=120,
                          env=clean | env | {"PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_qpipe_config_lists_every_knob_with_credentials_masked():
    password, access, secret = "brokerPW4d9f", "ACCESSk3y77", "S3SECRETq8z1x"
    proc = _qpipe_config({"QPIPE_BROKER_URL": f"redis://:{password}@127.0.0.1:6390/2",
                          "QPIPE_S3_ACCESS_KEY": access, "QPIPE_S3_SECRET_KEY": secret, "QPIPE_LOCK_TTL": "8"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for credential in (password, access, secret):
        assert credential not in out and credential not in proc.stderr
    assert f"QPIPE_BROKER_URL=redis://:{MASK}@127.0.0.1:6390/2  (default: unset)" in out
    assert f"QPIPE_S3_ACCESS_KEY={MASK}  (default: unset)" in out
    assert f"QPIPE_S3_SECRET_KEY={MASK}  (default: unset)" in out
    assert "QPIPE_LOCK_TTL=8  (default: 60)\n    seconds a stage lock outlives" in out
    assert re.findall(r"^(QPIPE_[A-Z0-9_]+)=", out, re.M) == [env_name(f) for f in Settings.model_fields]


def test_qpipe_config_refuses_a_bad_value_with_exit_2():
    proc = _qpipe_config({"QPIPE_RESTORE_INTERVAL": "soon"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("qpipe: refused: QPIPE_RESTORE_INTERVAL (soon) must be a whole number"), proc.stderr


def test_store_retries_follow_qpipe_store_attempts_and_log_each_retry(clean_env, caplog):
    from pipeline.store import _retrying

    calls = []

    def unreachable() -> None:
        calls.append(1)
        raise TransientError("object store 127.0.0.1:1 unreachable (MaxRetryError)")

    clean_env.setenv("QPIPE_STORE_ATTEMPTS", "3")
    with caplog.at_level(logging.WARNING, logger="pipeline.store"), pytest.raises(TransientError) as raised:
        _retrying("upload k on 127.0.0.1:1", unreachable)
    assert len(calls) == 3 and str(raised.value) == "object store 127.0.0.1:1 unreachable (MaxRetryError)"
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.store"]
    assert len(lines) == 2, lines
    for n, line in enumerate(lines, 1):  # the line the outage tests wait for, unchanged
        assert re.fullmatch(rf"upload k on 127\.0\.0\.1:1 failed \(object store 127\.0\.0\.1:1 unreachable "
                            rf"\(MaxRetryError\)\); retry {n}/2 in \d+\.\ds", line), line
        delay = float(line.rsplit(" ", 1)[1][:-1])
        assert 0 <= delay <= 0.5 * 2 ** (n - 1) + 0.05  # full jitter under the doubling cap

    def refused() -> None:  # a refusal is never retried
        calls.append(1)
        raise ConfigError("bucket 'x' does not exist")

    calls.clear()
    with pytest.raises(ConfigError):
        _retrying("stat k", refused)
    assert len(calls) == 1
