"""Horizontal scaling and Flower, with real parts: the session's Valkey, S3 and workers plus a
second cpu worker and a real Flower process, all on loopback.

One pipeline whose variants fan out (one with ``fallback: auto``, whose sensitivity analysis
is a chord of parts inside the fan-out) runs while two cpu-queue workers are up: its branch
stages and its sensitivity parts must have run on both of them, the join after every part, and
Flower (started before the run, fed by the workers' task events) must list the run's tasks under
their qpipe names, with the run id and stage in the arguments and no credentials."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from tests.conftest import SMALL_SPEC, wait_for
from tests.servers import Cluster, FlowerProcess
from workers.client import Client

pytestmark = pytest.mark.integration
PARTS = 4
RUNTIMES = ["torchscript", "onnxruntime", "openvino"]


def test_two_cpu_workers_share_the_fan_out_and_flower_lists_the_tasks(cluster, broker, s3_env, tmp_path):
    # the second worker joins the session's cluster on its broker, and stops with this test
    with (Cluster(tmp_path, cluster["store"], broker=broker) as joined,
          FlowerProcess(cluster["broker"], tmp_path / "flower") as flower):
        second = joined.worker("cpu", logs=tmp_path / "logs")
        # Flower's HTTP API answers before its event receiver is connected; a heartbeat counted
        # in its own metrics shows that events reach it (else the first task could be missed)
        wait_for(lambda: f'flower_worker_online{{worker="{second.node}"}} 1.0' in flower.text("/metrics"),
                 timeout=60, every=0.5)
        spec = copy.deepcopy(SMALL_SPEC)
        spec["name"] = "digits-scale"
        spec["seed"] = 11  # a key of its own: nothing from other tests' runs is reused
        spec["quantize"]["variants"] = [v for v in spec["quantize"]["variants"] if v["method"] != "qat"]
        # its sensitivity analysis fans out in PARTS tasks joined by its quantize stage (a chord)
        spec["quantize"]["variants"][0]["fallback"] = "auto"
        spec["quantize"]["sensitivity_parts"] = PARTS
        spec["benchmark"]["runtimes"] = RUNTIMES  # measured on the workers that would serve them
        handle = Client(cluster["broker"], cluster["store"]).submit(spec)
        summary = handle.wait(timeout=600, poll=0.5)
        assert summary["status"] == "SUCCESS", summary

        branch = [s for s in summary["stages"] if s["stage"] in ("calibrate", "quantize", "benchmark")]
        per_worker = Counter(s["worker"] for s in branch)
        cpu_nodes = {cluster["workers"][0].node, second.node}
        assert set(per_worker) == cpu_nodes, f"branch stages per worker: {dict(per_worker)}"
        parts = [s for s in summary["stages"] if s["stage"] == "sensitivity"]
        assert len(parts) == PARTS and all(s["state"] == "done" for s in parts), parts
        assert {s["worker"] for s in parts} == cpu_nodes, f"sensitivity parts per worker: {parts}"
        join = next(s for s in summary["stages"] if s["id"] == "quantize:ptq-minmax")
        assert join["started"] >= max(s["finished"] for s in parts), (join, parts)  # ran after every part
        fallback = next(v for v in summary["variants"] if v["name"] == "ptq-minmax")["fallback"]
        assert fallback["met"] is True and len(fallback["tried"]) == len(fallback["kept_fp32"]) + 1, fallback
        for v in summary["variants"]:
            if v["method"] == "static":  # every form measured, or the reason it was not
                assert set(v["runtimes"]) | set(v.get("skipped_runtimes", {})) == set(RUNTIMES), v

        seen: list[dict] = []

        def run_tasks() -> list[dict]:
            tasks = flower.get("/api/tasks?limit=1000")
            seen[:] = [t for t in tasks.values() if handle.run_id in str(t.get("args"))]
            done = len(seen) >= len(summary["stages"]) and all(t.get("state") == "SUCCESS" for t in seen)
            return seen if done else []

        try:  # Flower reads the workers' events as they come: give a loaded machine time
            tasks = wait_for(run_tasks, timeout=180, every=1.0)
        except TimeoutError:
            pytest.fail(f"Flower saw {sorted((t['name'], t.get('state')) for t in seen)}")
        names = Counter(t["name"] for t in tasks)
        assert names["qpipe.finetune"] == 1 and names["qpipe.report"] == 1, names
        assert names["qpipe.benchmark"] == 4 and names["qpipe.calibrate"] == 2, names
        assert names["qpipe.sensitivity"] == PARTS, names
        assert {t["worker"] for t in tasks if t["name"] == "qpipe.benchmark"} <= cpu_nodes
        blob = json.dumps(tasks)
        assert s3_env["QPIPE_S3_SECRET_KEY"] not in blob and s3_env["QPIPE_S3_ACCESS_KEY"] not in blob
        workers = flower.get("/api/workers?refresh=true")
        assert second.node in workers, sorted(workers)
