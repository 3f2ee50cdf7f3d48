"""Latency measurement shared by the benchmark stage and the scripts under bench/."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads and restore the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine (all cores) has spent busy since boot, from /proc/stat
    (None where there is none): the bench scripts use it to tell a quiet measurement from one
    that shared the cores with other processes."""
    import os

    try:
        with open("/proc/stat", encoding="ascii") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        raise ValueError("no values")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@torch.no_grad()
def measure_latency(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, warmup: int,
                    iterations: int, max_seconds: float = 60.0) -> dict[str, float]:
    """Latency of ``model(x)`` in ms after ``warmup`` calls: p50, p95, mean, and throughput in
    images per second at the median. Stops early (keeping at least 3 samples) past
    ``max_seconds``."""
    for _ in range(warmup):
        model(x)
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(iterations):
        t0 = time.perf_counter()
        model(x)
        samples.append((time.perf_counter() - t0) * 1000.0)
        if time.perf_counter() > deadline and len(samples) >= 3:
            break
    samples.sort()
    p50 = percentile(samples, 0.5)
    return {"p50_ms": p50, "p95_ms": percentile(samples, 0.95), "mean_ms": statistics.fmean(samples),
            "throughput_ips": x.shape[0] * 1000.0 / p50, "samples": len(samples)}
