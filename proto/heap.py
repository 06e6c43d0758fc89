"""Freed memory kept in the process for the next transfer instead of handed back to the kernel.

A streamed transfer allocates its messages anew, a few MiB at a time (gRPC's read buffers, the
bytes of each received message, the encoded chunks a sender joins). glibc's malloc hands large
freed blocks back to the kernel (unmapping them, or trimming its heaps once their free top passes
twice the largest such block yet), so the next message faults in fresh zeroed pages: page faults
took about a fifth of a host's CPU time during a 256 MiB stream put here. Raising malloc's trim
and mmap thresholds keeps those blocks in the heap, ready for the next message. The client and
every host set them once at start (`keep_freed_memory`); TransferConfig holds the sizes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

from proto.config import TransferConfig, from_env

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MAX_MMAP_THRESHOLD = 32 << 20

_INT_MAX = (1 << 31) - 1
_lock = threading.Lock()
_applied: tuple[int, int] | None = None


def keep_freed_memory(trim_bytes: int, mmap_bytes: int) -> bool:
    """Keeps up to `trim_bytes` of freed memory at the top of each malloc heap, and serves
    allocations up to `mmap_bytes` (at most MAX_MMAP_THRESHOLD) from the heaps rather than fresh
    mappings; 0 leaves a setting as it is. Once per process (later calls change nothing); returns
    whether the settings are in force (False where malloc is not glibc's)."""
    global _applied
    with _lock:
        if _applied is not None:
            return True
        libc = _glibc()
        if libc is None:
            return False
        if trim_bytes > 0 and not libc.mallopt(M_TRIM_THRESHOLD, min(trim_bytes, _INT_MAX)):
            return False
        if mmap_bytes > 0 and not libc.mallopt(M_MMAP_THRESHOLD,
                                               min(mmap_bytes, MAX_MMAP_THRESHOLD)):
            return False
        _applied = (trim_bytes, mmap_bytes)
        return True


def keep_freed_memory_as_configured() -> bool:
    """`keep_freed_memory` with TransferConfig's sizes (PATHWAYS_MALLOC_* overrides)."""
    settings = from_env(TransferConfig)
    return keep_freed_memory(settings.malloc_trim_threshold_bytes,
                             settings.malloc_mmap_threshold_bytes)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (other mallocs ignore mallopt)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError) as exc:
        log.debug("malloc settings left alone: %s", exc)
        return None
