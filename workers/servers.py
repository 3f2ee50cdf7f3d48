"""Supervision of child processes: the ``qpipe worker`` processes of the embedded cluster
(:mod:`workers.embedded`) and, in the tests, the servers they start.

:class:`ServerProcess` runs a child in its own session/process group, logging to a file, with
start/stop/kill/restart and an interpreter-exit finalizer, so that no child outlives its parent.
The module deliberately imports neither torch nor celery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

logger = logging.getLogger(__name__)


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
