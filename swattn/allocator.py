"""Keeping freed memory for reuse: the C allocator's settings for a process that computes in steps.

Every step of a model (a prefill chunk, a decode step) allocates the same large temporaries
(projections, MLP intermediates, oneDNN scratch) and frees them at its end. glibc's malloc hands
such memory back to the kernel by default (buffers above its adaptive mmap threshold are
unmapped on free; a free heap top above its trim threshold is trimmed), so the next step
faults every page in again, zero-filled by the kernel. In `swattn serve` under load (512-token
prompts, 8 streams, the benchmark model in bf16) that was about 360,000 page faults in 8.5 s,
and a 512-token prefill step took 210-250 ms instead of 180. Fixing both thresholds keeps the
freed pages mapped for the next step.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc refuses an mmap threshold above this on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger
# buffers are rare (a prefill chunk's biggest temporary is under it) and still go back on free
MMAP_THRESHOLD = 32 << 20
# a free heap top up to this stays mapped; bounded, so a one-off burst does not pin memory forever
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Sets glibc's malloc to keep freed memory mapped for reuse; gives whether it took effect.

    Buffers under ``mmap_threshold`` bytes come from the heap rather than their own mapping,
    and up to ``trim_threshold`` bytes of free heap stay mapped. Fixing either one also stops
    glibc adapting the other, so both are set. It is process-wide: swattn's commands call it
    at start; a program embedding swattn (its own server around :class:`swattn.serve.engine.Engine`)
    may call it once too. Elsewhere than glibc (musl, macOS) it does nothing and gives False.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value < 2**31:
            raise ValueError(f"{name} must be in 1 .. 2**31 - 1 bytes, got {value}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl's mallopt accepts and ignores everything)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
