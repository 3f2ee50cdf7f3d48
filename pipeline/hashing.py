"""Canonical JSON and content digests: the basis of content-addressed stage outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1024 * 1024


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_key(stage: str, version: int, config: dict, inputs: dict[str, str]) -> str:
    """The content address of a stage's output.

    ``inputs`` maps each input name to a digest: the source data's sha256 for ingest, the
    upstream stage's key otherwise (a stage's outputs are a function of its key, so the key
    stands for their content).
    """
    payload = {"stage": stage, "version": version, "config": config, "inputs": inputs}
    return sha256_bytes(canonical_json(payload).encode())[:32]
