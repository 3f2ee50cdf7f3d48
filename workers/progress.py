"""Live progress for ``qpipe run`` and ``qpipe watch``.

Workers write each stage's state, progress (0..1), a detail line (``epoch 2/3 batch 10/23``,
``128/256 images``) and their node name to the run status in Redis while they work; these
printers read it through ``RunHandle.wait(on_update=...)``.

* On a terminal, :class:`LiveBoard` redraws one line per stage in place: a progress bar, the
  percentage, the elapsed time, the worker and the detail.
* Elsewhere (CI logs, pipes, ``--no-progress``), :class:`LinePrinter` appends a timestamped line
  when a stage changes state and, unless progress is off, at every tenth of its progress, so a
  log stays short and readable.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, TextIO

BAR_WIDTH = 20
ACTIVE = ("running", "retrying")


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = max(0.0, min(1.0, fraction))
    full = int(round(fraction * width))
    return "[" + "#" * full + "-" * (width - full) + "]"


def elapsed(s: dict[str, Any], now: float) -> float | None:
    started = s.get("started")
    if not started:
        return None
    end = s.get("finished") if s.get("state") not in ACTIVE and s.get("finished") else now
    return max(0.0, float(end) - float(started))


def _fmt_seconds(sec: float | None) -> str:
    if sec is None:
        return ""
    if sec < 60:
        return f"{sec:.1f}s"
    if sec < 3600:
        return f"{int(sec // 60)}m{int(sec % 60):02d}s"
    return f"{int(sec // 3600)}h{int(sec % 3600 // 60):02d}m"


def stage_line(s: dict[str, Any], now: float, *, with_bar: bool = True) -> str:
    """One stage as one line: id, state, bar and percentage, elapsed time, worker, detail or error."""
    state = s.get("state", "pending")
    frac = 1.0 if state in ("done", "cached") else float(s.get("progress") or 0.0)
    parts = [f"{s['id']:<28}", f"{state:<9}"]
    if with_bar:
        parts.append(f"{bar(frac)} {100 * frac:3.0f}%")
    elif state in ACTIVE:
        parts.append(f"{100 * frac:5.1f}%")
    took = _fmt_seconds(elapsed(s, now))
    if took:
        parts.append(f"{took:>7}")
    if s.get("worker") and state != "pending":
        parts.append(f"on {s['worker']}")
    if s.get("error") and state in ("failed", "retrying", "cancelled"):
        parts.append(f" {s['error']}")
    elif s.get("detail") and state in ACTIVE + ("pending",):
        parts.append(f" {s['detail']}")
    return " ".join(parts)


class LinePrinter:
    """Append-only output: a line per state change (and per tenth of progress if ``progress``)."""

    def __init__(self, out: TextIO, progress: bool = True) -> None:
        self.out = out
        self.progress = progress
        self.t0 = time.monotonic()
        self.seen: dict[str, tuple[str, int]] = {}

    def update(self, status: dict[str, Any]) -> None:
        now = time.time()
        for s in status.get("stages", []):
            tenth = int((s.get("progress") or 0) * 10) if self.progress and s["state"] in ACTIVE else 0
            mark = (s["state"], tenth)
            if self.seen.get(s["id"]) != mark:
                self.seen[s["id"]] = mark
                line = stage_line(s, now, with_bar=False)
                print(f"[{time.monotonic() - self.t0:7.1f}s] {line}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class LiveBoard:
    """A block of lines, one per stage, redrawn in place with ANSI cursor moves."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.drawn = 0

    def update(self, status: dict[str, Any]) -> None:
        now = time.time()
        width = shutil.get_terminal_size((120, 24)).columns
        stages = status.get("stages", [])
        done = sum(1 for s in stages if s["state"] in ("done", "cached"))
        head = (f"run {status.get('run_id', '')} {status.get('status', '')}: {done}/{len(stages)} stages done, "
                f"{_fmt_seconds(time.monotonic() - self.t0)}")
        lines = [head] + [stage_line(s, now) for s in stages]
        buf = []
        if self.drawn:
            buf.append(f"\x1b[{self.drawn}F")  # back to the first line of the previous frame
        for line in lines:
            buf.append("\x1b[2K" + line[: max(width - 1, 20)] + "\n")
        self.out.write("".join(buf))
        self.out.flush()
        self.drawn = len(lines)

    def close(self) -> None:
        self.out.flush()


def printer(out: TextIO, progress: bool) -> LinePrinter | LiveBoard:
    """The live board on a terminal when progress is wanted, plain lines otherwise."""
    isatty = getattr(out, "isatty", None)
    if progress and isatty is not None and isatty():
        return LiveBoard(out)
    return LinePrinter(out, progress=progress)
