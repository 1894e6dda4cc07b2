"""keep_freed_memory: freed buffers stay mapped for the next step (checked in a fresh process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from swattn.allocator import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (elsewhere it does nothing)")

# Frees a touched 24 MB buffer, then takes one of the same size again; prints how much resident
# memory the free gave back and how many pages the second buffer faulted in.
_PROBE = """
import ctypes, resource, sys
from swattn.allocator import keep_freed_memory
from swattn.profiling import rss_bytes
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
n = 24 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n)
before = rss_bytes(); libc.free(p); returned = before - rss_bytes()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n)
print(returned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    returned, faults = map(int, out.split())
    return returned, faults


@glibc
def test_freed_buffers_stay_mapped():
    pages = (24 << 20) // 4096
    returned, faults = _probe("default")
    # the premise: by default glibc maps a buffer this size on its own and unmaps it on free
    assert returned > 20 << 20 and faults > pages // 2
    returned, faults = _probe("keep")
    assert returned < 1 << 20, f"{returned} bytes went back to the system"
    assert faults < pages // 10, f"the same buffer again faulted {faults} pages in"


def test_bad_thresholds():
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=0)
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=2**31)


def test_the_commands_keep_freed_memory(monkeypatch, capsys):
    import swattn.allocator
    from swattn.cli import main

    calls = []
    monkeypatch.setattr(swattn.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["--version"]) == 0
    assert calls == [1]
