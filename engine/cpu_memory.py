"""Keep freed CPU memory in the process heap.

Each engine step allocates and frees tens of megabytes of temporaries (gathered K/V, logits).
By default glibc hands such blocks back to the kernel on free and the next step faults every
page in again, which on a VM costs more than the arithmetic: decode attention ran ~3x slower.
Raising the mmap and trim thresholds keeps the blocks in the heap for reuse."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
_done = False


def keep_freed_memory_in_heap() -> None:
    global _done
    if _done:
        return
    _done = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(
            _M_TRIM_THRESHOLD, 1 << 30
        )
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        ok = False
    logger.debug("malloc thresholds raised: %s", bool(ok))
