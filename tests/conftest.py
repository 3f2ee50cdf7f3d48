"""Shared fixtures. The distributed ones start real servers on loopback: a Valkey broker, a
SeaweedFS S3 server, and real ``qpipe worker`` processes for the cpu and gpu queues."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.plan import build_plan
from pipeline.runner import prepare_sources
from pipeline.spec import parse_spec
from pipeline.store import FileStore
from tests.servers import Cluster, RedisServer

SMALL_SPEC = {
    "name": "digits-small",
    "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 32, "calib_size": 64},
    "model": {"arch": "resnet18"},
    # Two epochs at batch 32 (90 steps) train to 0.89-0.94 val top-1 for seeds 0-3 on this data, far
    # from the tests' 0.5 floor on any CPU; one epoch at batch 64 ended anywhere from 0.15 to 0.66
    # with the seed alone, and at 0.36 on an AMD EPYC where oneDNN picks other kernels than here.
    "finetune": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "quantize": {"backend": "x86", "variants": [
        {"name": "ptq-minmax", "method": "static", "observer": "minmax"},
        {"name": "ptq-histogram", "method": "static", "observer": "histogram"},
        {"name": "dynamic", "method": "dynamic"},
        {"name": "qat", "method": "qat", "epochs": 1, "lr": 0.001},
    ]},
    # TorchScript only: the ONNX Runtime and OpenVINO forms are measured by test_sensitivity and test_scale
    "benchmark": {"batch_sizes": [1, 8], "threads": 1, "warmup": 1, "iterations": 5, "accuracy_budget": 0.05,
                  "runtimes": ["torchscript"]},
}


@pytest.fixture(scope="module")
def plan_store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    """A file store for building plans (sources are uploaded when a plan is built)."""
    return FileStore(tmp_path_factory.mktemp("plan-store"))


def plan_of(spec_dict: dict, store: FileStore) -> list[dict]:
    spec = parse_spec(spec_dict)
    return build_plan(spec, prepare_sources(spec, store))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.servers import SeaweedS3Server

    server = SeaweedS3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    server.make_bucket("qpipe")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_server) -> Iterator[dict[str, str]]:
    """QPIPE_S3_* set for this process and for the worker processes it starts."""
    env = {"QPIPE_S3_ENDPOINT": s3_server.endpoint, "QPIPE_S3_ACCESS_KEY": s3_server.access_key,
           "QPIPE_S3_SECRET_KEY": s3_server.secret_key, "QPIPE_S3_SECURE": "false"}
    from tests.servers import env_vars

    with env_vars(env):
        yield env


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path_factory.mktemp("broker"), appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(broker: RedisServer, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One cpu-queue and one gpu-queue worker process against the broker and the S3 store."""
    logs = tmp_path_factory.mktemp("worker-logs")
    running = Cluster(logs, "s3://qpipe/test", broker=broker)
    try:
        running.worker("cpu", logs=logs), running.worker("gpu", logs=logs)
        yield running.as_dict()
    finally:
        running.stop()


def wait_for(pred, timeout: float = 180, every: float = 0.2):
    """Poll ``pred`` until it returns something true (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"condition not met within {timeout}s")


def worker_logs(cluster: dict) -> str:
    return "\n".join(Path(w.log_path).read_text(errors="replace")[-6000:] for w in cluster["workers"])


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of in-process tests: tiny models gain nothing from more,
    one thread keeps every float reduction in one order, and on a busy 2-core machine OpenMP
    threads spinning against other processes made test_stages.py ~5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a usable CUDA device: without one they are skipped, with the reason
    the probe gives. The probe runs in a child process, so this one never initialises CUDA."""
    needs_gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not needs_gpu:
        return
    from workers.gpu import probe

    found = probe()
    if found.usable:
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: no usable CUDA device: {found.why_none()}")
    for item in needs_gpu:
        item.add_marker(skip)
