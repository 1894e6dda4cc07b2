"""Measuring time, peak memory and work, the same way in the demo and the benchmarks."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch


def attention_pairs(n: int, window: int | None) -> int:
    """Query-key pairs causal window attention computes over n tokens (the rest is masked)."""
    w = n if window is None else min(window, n)
    return n * w - w * (w - 1) // 2


def attention_flops(n: int, window: int | None, heads: int, head_dim: int, backward: bool = False) -> float:
    """FLOPs of attention with a window-aware count: 4 per pair and head dim (QK^T and PV).

    The backward counts 2.5x the forward (five matrix products against two), as
    flash-attention's benchmarks do.
    """
    fwd = 4.0 * heads * head_dim * attention_pairs(n, window)
    return fwd * (3.5 if backward else 1.0)


def median_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 1024, repeat: int = 5) -> float:
    """This machine's square matrix product rate, in GFLOP/s, with PyTorch's threads."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    return 2 * size**3 / median_time(lambda: a @ b, repeat=repeat) / 1e9


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Starts a new peak-memory measurement: frees what can be freed, resets Linux's VmHWM."""
    gc.collect()
    try:  # return freed heap pages to the system, so they don't count as the new baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak_rss` (or process start)."""
    return _status_kib("VmHWM") * 1024


def measure(
    fn: Callable[[], object], repeat: int = 3, warmup: bool = True, long_run_s: float = 60.0
) -> tuple[float, int]:
    """Times ``fn`` and measures the peak growth of resident memory while it runs.

    With ``warmup``, one untimed call first (kernel builds, library loading, compilation
    stay out of both figures); a function whose warm-up took over ``long_run_s`` is then
    timed once.

    Returns:
        (median seconds, peak bytes above the resident memory before the timed calls)
    """
    if warmup:
        start = time.perf_counter()
        fn()
        if time.perf_counter() - start > long_run_s:
            repeat = 1
    reset_peak_rss()
    baseline = rss_bytes()
    seconds = median_time(fn, repeat=repeat, warmup=0)
    return seconds, peak_rss_bytes() - baseline


def fmt_bytes(n: float) -> str:
    """Gives ``n`` bytes as MB or GB, the unit chosen for readability."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
