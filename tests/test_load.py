"""A reduced load test: pipelines submitted at once against two worker processes all succeed,
none is lost, and no content key is computed twice, where it could be: the pipelines share their
stages (bench/load.py's shared_spec: the same spec twice at once, and specs that differ only after
the fine-tune), and the cpu worker runs two stages at a time. bench/load.py runs the full 50."""

from __future__ import annotations

import pytest

from bench import load
from workers.embedded import EmbeddedCluster

pytestmark = pytest.mark.integration


def test_six_pipelines_sharing_stages_at_once(tmp_path):
    with EmbeddedCluster(home=tmp_path, cpu_concurrency=2) as cluster:
        result = load.run_load(6, cluster, timeout=900, shared=True)
    assert result["succeeded"] == 6, result
    assert result["lost"] == 0 and result["stages_not_finished"] == 0, result
    # 11 content keys: ingest, fine-tune, 2 calibrations, 2 quantizations, 2 fp32 and 3 int8
    # benchmarks; each wanted by 2 to 6 of the pipelines, all at about the same time
    assert result["content_keys"] == 11 and result["shared_keys"] == 11, result
    # every key computed exactly once: never twice, and never reused without a computation
    assert result["executions_per_key"] == {"1": 11}, result
    assert result["lock_waits"] >= 1, "no two deliveries of one key overlapped: the lock was never in play"
    for node, rss in result["worker_rss_mb"].items():
        assert rss["after"] < 4000, (node, rss)
