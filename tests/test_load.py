"""A reduced load test: pipelines submitted at once against two worker processes all succeed,
none is lost, and no stage is computed twice (bench/load.py runs the full 50)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from workers.embedded import EmbeddedCluster

pytestmark = pytest.mark.integration


def _bench_load():
    path = Path(__file__).resolve().parent.parent / "bench" / "load.py"
    spec = importlib.util.spec_from_file_location("bench_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_six_pipelines_at_once(tmp_path):
    load = _bench_load()
    with EmbeddedCluster(home=tmp_path) as cluster:
        result = load.run_load(6, cluster, timeout=900)
    assert result["succeeded"] == 6, result
    assert result["lost"] == 0 and result["stages_not_finished"] == 0, result
    assert result["computed_twice"] == 0, result
    for node, rss in result["worker_rss_mb"].items():
        assert rss["after"] < 4000, (node, rss)
