"""The progress printers of ``qpipe run``/``qpipe watch`` (pure, in-process)."""

from __future__ import annotations

import io
import re

from workers.progress import LinePrinter, LiveBoard, bar, printer, stage_line

NOW = 1_000_000.0


def _stage(id_: str, state: str, progress: float = 0.0, **kw) -> dict:
    return {"id": id_, "stage": id_.split(":")[0], "state": state, "progress": progress, **kw}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_fills_in_proportion_and_clamps():
    assert bar(0.0, 10) == "[----------]"
    assert bar(0.5, 10) == "[#####-----]"
    assert bar(1.7, 10) == "[##########]"
    assert bar(-1, 10) == "[----------]"


def test_running_stage_line_shows_bar_percent_elapsed_worker_and_detail():
    s = _stage("finetune", "running", 0.25, started=NOW - 75, worker="qpipe-gpu-1@host",
               detail="epoch 1/3 batch 5/20")
    line = stage_line(s, NOW)
    assert "[#####---------------]" in line and " 25%" in line
    assert "1m15s" in line
    assert "on qpipe-gpu-1@host" in line
    assert "epoch 1/3 batch 5/20" in line


def test_finished_stage_shows_its_own_duration_and_failed_stage_its_error():
    done = stage_line(_stage("ingest", "done", 1.0, started=NOW - 100, finished=NOW - 90, worker="w"), NOW)
    assert "10.0s" in done and "100%" in done
    failed = stage_line(_stage("quantize:dyn", "failed", 0.3, started=NOW - 5, finished=NOW - 4,
                               error="StageError: unsupported op", detail="exporting"), NOW)
    assert "unsupported op" in failed and "exporting" not in failed
    pending = stage_line(_stage("benchmark:fp32", "pending"), NOW)
    assert "pending" in pending and "on " not in pending


def test_line_printer_prints_on_state_changes_and_each_tenth_only():
    out = io.StringIO()
    p = LinePrinter(out, progress=True)
    for frac in (0.0, 0.01, 0.05, 0.12, 0.13, 0.55):
        p.update({"stages": [_stage("finetune", "running", frac, started=NOW)]})
    p.update({"stages": [_stage("finetune", "done", 1.0, started=NOW, finished=NOW + 3)]})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # 0.0, 0.12 (1st tenth), 0.55 (5th tenth), done
    assert all(re.match(r"\[\s*\d+\.\d+s\] finetune", ln) for ln in lines)
    assert "\x1b" not in out.getvalue()  # plain text for logs


def test_line_printer_without_progress_prints_state_changes_only():
    out = io.StringIO()
    p = LinePrinter(out, progress=False)
    for frac in (0.0, 0.3, 0.9):
        p.update({"stages": [_stage("qat:qat", "running", frac)]})
    p.update({"stages": [_stage("qat:qat", "done", 1.0)]})
    assert len(out.getvalue().splitlines()) == 2


def test_live_board_redraws_the_same_block_in_place():
    out = _Tty()
    board = LiveBoard(out)
    st = {"run_id": "r1", "status": "RUNNING",
          "stages": [_stage("ingest", "done", 1.0), _stage("finetune", "running", 0.5, started=NOW)]}
    board.update(st)
    first = out.getvalue()
    assert "\x1b[3F" not in first and first.count("\n") == 3  # header + 2 stages
    board.update(st)
    second = out.getvalue()[len(first):]
    assert second.startswith("\x1b[3F")  # cursor back over the previous 3 lines
    assert second.count("\x1b[2K") == 3
    assert "1/2 stages done" in second


def test_printer_picks_the_board_only_for_a_terminal_with_progress():
    assert isinstance(printer(_Tty(), True), LiveBoard)
    assert isinstance(printer(_Tty(), False), LinePrinter)
    assert isinstance(printer(io.StringIO(), True), LinePrinter)
