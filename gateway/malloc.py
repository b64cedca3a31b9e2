"""Process-wide allocator setting of a long-running gateway: a fixed glibc mmap threshold.

glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` (returned to the
system by ``free``), smaller ones from the heap. By default the threshold is *dynamic*: each freed
mmap'd block raises it to that block's size, up to 32 MiB. The gateway frees large blocks as its state
grows (a doubling array's old copy), which lifts the threshold, after which every batch's temporaries
of a few hundred KiB (score matrices, line-protocol bodies) come from the heap and leave it in holes
between longer-lived blocks that ``free`` cannot give back: 10,000 machines × 8 metrics ran ~55 MB
above their live state (``bench/memory.py``: 484 MB RSS, 426 MB after ``malloc_trim``). A fixed
threshold of 1 MiB (setting it turns the dynamic adjustment off) keeps blocks from 1 MiB up out of the
heap; below that, holes are small. Costs: one ``mmap``/``munmap`` pair per block of 1 MiB or more
(a few per batch at most).

Nothing computed depends on it. A no-op where the C library is not glibc.

>>> isinstance(fix_mmap_threshold(), bool)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes (fixed); True if it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
