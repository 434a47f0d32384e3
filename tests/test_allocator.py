"""reuse_freed_memory: arrays below 32 MiB come from the heap instead of fresh mmapped pages."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

from kldwrm_ref import allocator

PROBE = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    from kldwrm_ref.allocator import reuse_freed_memory

    class MallInfo2(ctypes.Structure):  # <malloc.h>, glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_while_holding(n_bytes):
        base = libc.mallinfo2().hblkhd
        array = np.ones(n_bytes // 4, np.float32)
        held = libc.mallinfo2().hblkhd - base
        del array
        return held

    size = 20 * 1024 * 1024
    before = mmapped_while_holding(size)
    took = reuse_freed_memory()
    after = mmapped_while_holding(size)
    print(before, int(took), after)
    """
)


def _glibc_with_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_20_mb_array_moves_from_mmapped_pages_to_the_heap():
    """In a fresh process a 20 MB array is mmapped (glibc's default); after the call it is not."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    before, took, after = (int(v) for v in out)
    assert before >= 20 * 1024 * 1024
    assert took == 1 and after == 0


def test_elsewhere_it_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.reuse_freed_memory() is False
