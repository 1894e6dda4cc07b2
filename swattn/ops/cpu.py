"""The compiled CPU backend: builds ``csrc/*.cpp`` (attention, linear layers, the decode step's
attention and row-wise layers, a whole layer's decode step) on first use and calls it.

The kernel is compiled for the machine it runs on (``-march=native``) by PyTorch's
extension builder and cached (``~/.cache/torch_extensions``; ``TORCH_EXTENSIONS_DIR``
moves it), so the first call takes about half a minute and later ones none.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

from swattn import dtypes
from swattn.ops.plan import plan_blocks
from swattn.ops.validate import Problem

DTYPES = dtypes.KERNEL
BLOCK_K = 512  # keys per score tile; a module attribute so tests can shrink it
# Matrix rows per work item (queries x grouped heads). A block of queries visits the keys of
# all its windows, so with a window, smaller blocks compute fewer masked scores: 64 rather than
# 128 rows (fp32 forward at w=1024: 341 against 319 GFLOP/s). Over long key ranges (full causal
# attention, windows past FULL_WINDOW) the masked edge is negligible and taller blocks read
# each key for more rows: ROWS_FULL (4096 queries over 16384 keys: bf16 651 against 721 ms,
# fp32 1203 against 1447 ms).
ROWS = 64
ROWS_FULL = 256
FULL_WINDOW = 8192
_SOURCES = [Path(__file__).parent / "csrc" / name for name in
            ("swattn_cpu.cpp", "swattn_linear.cpp", "swattn_decode.cpp", "swattn_rows.cpp", "swattn_block.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None}


def _cpu_signature() -> str:
    """Identifies the processor, so a cache shared between machines never runs foreign code."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        flags = platform.processor()
    return flags


def load() -> None:
    """Builds (once) and loads the kernel; raises RuntimeError saying why if it cannot."""
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        from torch.utils import cpp_extension

        source = b"".join(path.read_bytes() for path in (*_SOURCES, *_SOURCES[0].parent.glob("*.h")))
        key = hashlib.sha256(source + _cpu_signature().encode() + torch.__version__.encode()).hexdigest()[:12]
        name = f"swattn_cpu_{key}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob("*.so")):
            print("swattn: compiling the CPU kernel for this machine (once, about 30 s)...", file=sys.stderr)
        try:
            cpp_extension.load(
                name=name,
                sources=[str(path) for path in _SOURCES],
                # associative math lets the compiler vectorise the row sums; infinities are
                # still honoured (no -ffinite-math-only), which the masking relies on
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                              "-fassociative-math", "-fno-signed-zeros"],
                is_python_module=False,
                verbose=os.environ.get("SWATTN_VERBOSE_BUILD") == "1",
            )
        except Exception as exc:  # compiler missing, headers missing, ...
            _state["error"] = f"swattn: could not build the CPU kernel: {exc}"
            raise RuntimeError(_state["error"]) from exc
        _state["loaded"] = True


def available() -> bool:
    """Whether the kernel is (or can be) built here; warns once when it cannot."""
    try:
        load()
        return True
    except RuntimeError as exc:
        if not _state.get("warned"):
            warnings.warn(f"{exc}; falling back to the slower portable backend", RuntimeWarning, stacklevel=3)
            _state["warned"] = True
        return False


def native_bf16(enable: bool | None = None) -> bool:
    """Whether bf16 forwards and backwards run on the CPU's bf16 instructions (AVX512_BF16), built here.

    Without them (or with ``native_bf16(False)``, for comparisons) bf16 inputs are converted
    to fp32 tile by tile. ``enable`` switches the native path on or off for this process.
    """
    load()
    return bool(torch.ops.swattn.native_bf16(-1 if enable is None else int(enable)))


def native_fp32(enable: bool | None = None) -> bool:
    """Whether fp32 forwards and backwards run on swattn's own AVX-512 kernels, built here (else MKL's sgemm).

    ``enable`` switches the native path on or off for this process (off: for comparisons).
    """
    load()
    return bool(torch.ops.swattn.native_fp32(-1 if enable is None else int(enable)))


def block_q_for(groups: int, window: int | None = None) -> int:
    """Queries per block: about ROWS (ROWS_FULL without a window or past FULL_WINDOW) matrix
    rows once the grouped heads are folded in."""
    rows = ROWS_FULL if window is None or window > FULL_WINDOW else ROWS
    return max(1, rows // groups)


def _plan_tensors(p: Problem, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = plan_blocks(p, block_q, BLOCK_K)
    ptr = [0]
    flat: list[int] = []
    for blk in blocks:
        for j0, j1 in blk.key_ranges:
            flat += (j0, j1)
        ptr.append(len(flat) // 2)
    ranges = torch.tensor(flat, dtype=torch.int64).view(-1, 2)
    return torch.tensor(ptr, dtype=torch.int64), ranges


def _call_args(p: Problem) -> tuple:
    block_q = block_q_for(p.groups, p.window)
    block_ptr, ranges = _plan_tensors(p, block_q)
    window = -1 if p.window is None else p.window
    softcap = 0.0 if p.softcap is None else p.softcap
    return (p.q_pos, p.k_pos, window, softcap, p.scale, block_q, block_ptr, ranges)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives ``(out, lse)``; q, k, v contiguous CPU tensors of one dtype in DTYPES."""
    load()
    return torch.ops.swattn.forward(q, k, v, *_call_args(p))


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, p: Problem,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gives ``(dq, dk, dv)``."""
    load()
    # Work items are (batch row, kv head, segment of queries); split the queries when there
    # are fewer (row, head) pairs than threads, at the price of summing overlapping dK/dV.
    threads = torch.get_num_threads()
    pairs = p.batch * p.heads_kv
    segments = 1 if pairs >= threads else min(-(-2 * threads // pairs), max(1, p.q_len // 512))
    return torch.ops.swattn.backward(q, k, v, out, lse, dout, *_call_args(p), segments)
