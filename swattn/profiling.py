"""Measuring time, peak memory and work, the same way in the demo and the benchmarks."""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

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


def prefill_flops(cfg, begin: int, end: int) -> float:
    """FLOPs of running positions ``begin .. end-1`` through a model (its ``ModelConfig``) after
    ``begin`` cached ones: the projections and MLP of every token in every layer, and each layer's
    attention over what each query sees (window-aware; the LM head not counted)."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_token = 2 * (2 * h * cfg.num_heads * d + 2 * h * cfg.num_kv_heads * d + 3 * h * cfg.intermediate_size)
    pairs = sum(attention_pairs(end, w) - attention_pairs(begin, w) for w in cfg.windows)
    return float(per_token * (end - begin) * cfg.num_layers + 4 * cfg.num_heads * d * pairs)


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


def count_ops(fn: Callable[[], object], within: Sequence[torch.nn.Module] = ()) -> dict[str, int]:
    """The PyTorch ops ``fn()`` dispatches, counted as a dispatch mode sees them (after autograd,
    each call to a compiled op one): ``{"total": n, "within": m}``, ``m`` those dispatched
    inside the forward of any module in ``within`` (a model's layers: ops per layer is
    ``m / len(within)``, the rest is the step's shared bookkeeping)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    depth = [0]

    class Counter(TorchDispatchMode):
        total = inside = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.total += 1
            self.inside += depth[0] > 0
            return func(*args, **(kwargs or {}))

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    hooks = [h for m in within for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with Counter() as counter:
            fn()
    finally:
        for h in hooks:
            h.remove()
    return {"total": counter.total, "within": counter.inside}


def best_time(fn: Callable[[], object], repeat: int = 5) -> float:
    """Shortest wall time of ``fn`` in seconds over ``repeat`` runs, after one untimed call: the
    rate the hardware reaches (a median would fold a shared machine's noise into a yardstick)."""
    return min(median_time(fn, repeat=1, warmup=1 if i == 0 else 0) for i in range(repeat))


def matmul_rates(dtype: torch.dtype = torch.float32, size: int = 1024, repeat: int = 5) -> dict[str, float]:
    """This machine's square matrix product rate in GFLOP/s, per product: ``{"torch": ..., "onednn": ...}``.

    ``torch`` is PyTorch's default product (MKL's sgemm for fp32 on x86, oneDNN for bf16),
    ``onednn`` oneDNN's called directly (absent where the build has none). The best of
    ``repeat`` runs each: the rate the hardware reaches (a median would fold this VM's noise
    into the yardstick). The best of the products is the yardstick for "% of matmul".
    """
    from swattn.ops import linear

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    bt = b.t().contiguous()
    products = {"torch": lambda: a @ b}
    if linear._onednn_available():
        products["onednn"] = lambda: linear._onednn(a, bt)
    rates = {}
    for name, fn in products.items():
        rates[name] = 2 * size**3 / best_time(fn, repeat) / 1e9
    return rates


def describe_rates(rates: dict[str, float]) -> str:
    """``"448 (torch 219, onednn 448)"``: the best product's rate and each one's, for benchmark headers."""
    return f"{max(rates.values()):.0f} (" + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + ")"


def read_bandwidth(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """This machine's memory read rate in GB/s, with PyTorch's threads: the best reader measured.

    Readers over ``nbytes`` (far larger than the caches): PyTorch's sum of a float32 tensor,
    and swattn's one-row products streaming bf16, fp32 and q8 matrices of a few widths (when
    the CPU kernel builds here), best of ``repeat`` runs each. The yardstick for "fraction of
    the bandwidth" of decoding. On a shared virtual machine it moves from run to run, and the
    same reader can differ by half between two buffers of one size (where the memory landed):
    hence the maximum over several.
    """
    from swattn import quant
    from swattn.ops import linear

    def best_rate(fn, size):
        return size / best_time(fn, repeat) / 1e9

    x = torch.ones(nbytes // 4)
    rate = best_rate(lambda: x.sum(), nbytes)
    x = None  # free the gigabyte before the next reader
    if not linear.kernels():
        return rate
    for dtype, width in ((torch.bfloat16, 1024), (torch.bfloat16, 4096), (torch.float32, 4096)):
        size = torch.finfo(dtype).bits // 8
        w = torch.randn(nbytes // size // width, width).to(dtype)
        row = torch.ones(1, width, dtype=dtype)
        rate = max(rate, best_rate(lambda: linear.dense(row, w), w.numel() * size))
        w = None
    for width in (2304, 9216):
        n = nbytes * 32 // 34 // width // quant.LANES * quant.LANES
        qweight = torch.randint(0, 256, (n // quant.LANES, width * quant.LANES), dtype=torch.uint8)
        scales = torch.ones(n // quant.LANES, width // 2, dtype=torch.float16)
        row = torch.ones(1, width, dtype=torch.bfloat16)
        read = qweight.numel() + scales.numel() * 2
        rate = max(rate, best_rate(lambda: linear.quantized(row, qweight, scales, "q8", n), read))
        qweight = scales = None
    return rate


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB; None where there is no /proc (macOS, some containers)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    """The process's lifetime peak from getrusage (KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """Resident memory of this process now (without /proc: the peak so far, the closest portable figure)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else _maxrss_bytes()


def reset_peak_rss() -> None:
    """Starts a new peak-memory measurement: frees what can be freed, resets Linux's VmHWM.

    Without /proc the peak cannot be reset: :func:`peak_rss_bytes` then gives the lifetime
    peak, so a growth measured from it is a lower bound.
    """
    gc.collect()
    try:  # return freed heap pages to the system, so they don't count as the new baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak_rss` (without /proc: since the process started)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _maxrss_bytes()


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
    """Gives ``n`` bytes as KB, MB or GB, the unit chosen for readability (never a misleading "0 MB")."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e7:
        return f"{n / 1e6:.0f} MB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} KB"


def run_cell_in_subprocess(script: str, cell: dict, timeout: float) -> dict:
    """Runs ``script --worker JSON`` in a fresh Python, so the cell's peak memory is its own.

    Returns:
        The dict the worker printed after ``RESULT``, or ``{"error": why}`` (time-out, a
        kill by the out-of-memory killer, a crash).
    """
    cmd = [sys.executable, script, "--worker", json.dumps(cell)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    return {"error": ((proc.stderr.strip().splitlines() or ["no output"])[-1])[:70]}


def cell_worker(run_cell: Callable[[dict], dict], cell_json: str) -> None:
    """The ``--worker`` side: runs one cell and prints ``RESULT {json}``.

    An exception is a result too (a peer refusing, running out of memory): its first line.
    The cell's process keeps freed memory mapped, as swattn's commands do (every implementation
    alike; see :mod:`swattn.allocator`).
    """
    from swattn.allocator import keep_freed_memory

    keep_freed_memory()
    cell = json.loads(cell_json)
    try:
        result = run_cell(cell)
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        result = {"error": "out of memory" if "memory" in msg.lower() or "alloc" in msg.lower() else msg[:70]}
    print("RESULT " + json.dumps(result), flush=True)
