"""Shared fixtures. The distributed ones start real servers on loopback: a Valkey broker, a
SeaweedFS S3 server, and real ``qpipe worker`` processes for the cpu and gpu queues."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator

import pytest

from pipeline.store import FileStore
from tests.helpers import SMALL_SPEC, Finetuned, finetune_once, one_torch_thread, plan_of, wait_for, worker_logs
from tests.servers import Cluster, RedisServer

# The shared helpers live in tests/helpers.py; these names are imported here too only because
# older modules import them from tests.conftest: new code imports them from tests.helpers.
__all__ = ["SMALL_SPEC", "plan_of", "wait_for", "worker_logs"]


@pytest.fixture(scope="module")
def plan_store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    """A file store for building plans (sources are uploaded when a plan is built)."""
    return FileStore(tmp_path_factory.mktemp("plan-store"))


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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of in-process tests (see ``one_torch_thread``)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Finetuned:
    """The fine-tuned ResNet18 of ``tests.helpers.TRAINED_SPEC``, trained once per test run.

    Its store is in a folder every pytest-xdist worker of the run shares: a worker's base temp
    folder is ``<run>/popen-gwN``, so their parent is the run's (xdist's documented recipe);
    without xdist the run's own. The first worker to get here trains; the others wait on the
    lock in ``finetune_once`` and get the finetune stage's cache hit."""
    base = tmp_path_factory.getbasetemp()
    run = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return finetune_once(run / "shared-store")


# The integration modules (paths from the project root: two test files share a name) that take an
# xdist worker longest, in seconds of one worker's time
# (measured from `-v` timestamps of `make test`'s integration run on 2 cores, 2026-12-02; rounded).
# The integration run hands modules out longest first: xdist's default order (by number of tests)
# handed tests/test_faults.py out last, and its worker ran on for nearly 4 minutes after the other
# had finished. Modules not listed follow in collection order; a rough figure is enough.
LONGEST_MODULES = {"tests/test_faults.py": 690, "tests/test_security.py": 200,
                   "tests/test_after_a_run.py": 190, "tests/test_distributed.py": 150,
                   "tests/test_scale.py": 110, "tests/test_worker_cpus.py": 90,
                   "tests/test_poison.py": 90, "tests/test_cli.py": 90, "tests/test_gpu_workers.py": 80,
                   "tests/test_load.py": 75, "tests/test_metrics.py": 65}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first (``LONGEST_MODULES``; a stable sort, so each module's tests keep
    their order): with ``--dist loadfile --no-loadscope-reorder`` (the Makefile's integration run)
    an xdist worker takes the longest at the start and the other fills in around it.

    Tests marked ``gpu`` need a usable CUDA device: without one they are skipped, with the reason
    the probe gives. The probe runs in a child process, so this one never initialises CUDA."""
    items.sort(key=lambda item: -LONGEST_MODULES.get(item.path.relative_to(config.rootpath).as_posix(), 0))
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


@pytest.fixture(scope="module", autouse=True)
def _give_memory_back_after_each_module() -> Iterator[None]:
    """An xdist worker runs many modules in one process, each loading models, ONNX Runtime
    sessions and OpenVINO compiled models; freed, their memory stays in glibc's heap (one arena
    per thread the runtimes start), and the worker grew past 10 GB on a 24 GB machine. After each
    module: collect what is unreachable and hand free heap pages back to the system
    (``malloc_trim``; ctypes because no kept library exposes it)."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
