"""Warm memory for array bytes: buffers handed out as NumPy arrays and taken back, pages and all,
once the last view of them is gone.

A copy into memory the process has never touched runs at a fraction of a copy into memory it has:
every page is faulted in and zeroed on the way, one trap per 4 KiB page (measured on this
project's 2-core VM, 256 MiB: 0.3-0.5 GiB/s into `np.empty`'s memory against 7.5 GiB/s into
touched memory). A host copies every shard a put or a copy brings into memory its device buffer
then aliases, so that memory comes from here: when the device buffer is freed (JAX drops its
reference to the array it aliased), the buffer goes back to the pool and the next shard of that
size is copied into pages already in place. A buffer the pool makes afresh has its pages faulted
in by the kernel in one call (`populated_empty`, MAP_POPULATE: 2.3 GiB/s on the same VM), so
even the first transfer of a size does not pay a trap per page. A process may also fault in a
reserve ahead of its first transfer (`BufferPool.reserve`, a host at start-up): buffers are carved
from it before any is made afresh, so the first transfers find pages already in place.

`lease(owner, nbytes)` is the mechanism both this pool and shared-memory segments (proto.shm) use
to know when the views of a buffer are gone: the views are made over a fresh ctypes object that
exports `owner`'s bytes, NumPy keeps that object as the views' base, and a finalizer on it runs
when the last view goes, whoever held it (a device buffer, a fetch's caller).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

#: Alignment JAX's CPU client needs to alias host memory rather than copy it.
DEVICE_ALIGNMENT = 64
#: Buffers carved from a reserve start on a page.
_PAGE = mmap.PAGESIZE


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array starting on a DEVICE_ALIGNMENT boundary (NumPy's own allocations
    guarantee 16 bytes), so that a device buffer may alias it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + DEVICE_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def populated_empty(nbytes: int) -> np.ndarray:
    """`nbytes` uninitialised bytes (uint8), page-aligned, their pages faulted in and zeroed by
    the kernel in one call rather than by a trap per page at first touch; `aligned_empty` where
    the platform has no MAP_POPULATE. The memory goes back when the array and its views do."""
    if not _POPULATE or nbytes <= 0:
        return aligned_empty((nbytes,), np.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    return np.frombuffer(region, np.uint8)  # the array keeps the mapping alive


def lease(owner, nbytes: int, dtype: np.dtype, shape: tuple[int, ...],
          on_free: Callable[[], None] | None = None) -> np.ndarray:
    """A writable array of `shape` and `dtype` over the first bytes of `owner` (any writable
    buffer of at least `nbytes` bytes). `on_free` runs once this array and every view made of it
    are gone (from whichever thread drops the last one)."""
    exporter = (ctypes.c_char * nbytes).from_buffer(owner)
    if on_free is not None:
        weakref.finalize(exporter, on_free)
    return np.frombuffer(exporter, dtype, count=math.prod(shape)).reshape(shape)


class BufferPool:
    """Aligned host buffers of past arrays kept for reuse, at most `max_idle_bytes` of them idle.

    `empty(shape, dtype)` is `aligned_empty`, but from a buffer of the same size that an array no
    longer uses when there is one, else carved from the reserve (`reserve`) while it has room;
    the buffer returns here when the array it backs, and every view of it, is gone. Arrays under
    `min_bytes` are allocated plainly (their pages are few)."""

    def __init__(self, max_idle_bytes: int, min_bytes: int = 1 << 20) -> None:
        self.max_idle_bytes, self.min_bytes = max_idle_bytes, min_bytes
        # size -> idle buffers, each with whether it was carved from the reserve
        self._free: dict[int, list[tuple[np.ndarray, bool]]] = {}
        self._idle_bytes = 0
        self._reserve: np.ndarray | None = None  # the reserve's memory not carved yet
        self._reserving = 0  # bytes of a reserve being faulted in now
        self._reserve_wait_s = 0.0
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, wait_s: float = 10.0) -> None:
        """Faults in `nbytes` of memory now, in the caller's time (a start-up thread), for the
        buffers that would otherwise be made afresh: `empty` carves them from it, page-aligned,
        until it is used up. An `empty` that it could serve meanwhile waits for it (up to
        `wait_s`) rather than fault in memory of its own. Carved buffers come back and are reused
        like the others, whatever `max_idle_bytes` (the reserve's memory is held in any case)."""
        if nbytes <= 0:
            return
        with self._cond:
            self._reserving += nbytes
            self._reserve_wait_s = wait_s
        memory = None
        try:
            memory = populated_empty(nbytes)
        finally:
            with self._cond:
                self._reserving -= nbytes
                if memory is not None and (self._reserve is None
                                           or self._reserve.nbytes < memory.nbytes):
                    self._reserve = memory
                self._cond.notify_all()

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the reserve not carved yet."""
        with self._cond:
            return 0 if self._reserve is None else self._reserve.nbytes

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised, DEVICE_ALIGNMENT-aligned array that nothing else refers to."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes or self.max_idle_bytes <= 0:
            return aligned_empty(shape, dtype)
        with self._cond:
            raw, carved = self._idle(nbytes)
            if raw is None:
                raw = self._carve(nbytes)
                carved = raw is not None
        if raw is None:
            raw = populated_empty(nbytes)
        return lease(raw, nbytes, dtype, shape, lambda: self._give(raw, carved))

    def _idle(self, nbytes: int) -> tuple[np.ndarray | None, bool]:
        """An idle buffer of `nbytes` and whether it was carved; (None, False). Under the lock."""
        free = self._free.get(nbytes)
        if not free:
            return None, False
        raw, carved = free.pop()
        if not carved:
            self._idle_bytes -= nbytes
        return raw, carved

    def _carve(self, nbytes: int) -> np.ndarray | None:
        """`nbytes` from the reserve (waiting for one being made that could hold them), or None.
        Under the lock."""
        deadline = time.monotonic() + self._reserve_wait_s
        while (self._reserve is None or self._reserve.nbytes < nbytes) and \
                self._reserving >= nbytes and time.monotonic() < deadline:
            self._cond.wait(deadline - time.monotonic())
        if self._reserve is None or self._reserve.nbytes < nbytes:
            return None
        raw, rest = self._reserve[:nbytes], self._reserve[-(-nbytes // _PAGE) * _PAGE:]
        self._reserve = rest if rest.nbytes else None
        return raw

    def _give(self, raw: np.ndarray, carved: bool) -> None:
        with self._cond:
            if carved:
                self._free.setdefault(raw.nbytes, []).append((raw, True))
            elif self._idle_bytes + raw.nbytes <= self.max_idle_bytes:
                self._free.setdefault(raw.nbytes, []).append((raw, False))
                self._idle_bytes += raw.nbytes

    @property
    def idle_bytes(self) -> int:
        """Bytes of buffers waiting for reuse (those carved from the reserve left out)."""
        return self._idle_bytes

    def clear(self) -> None:
        """Lets every idle buffer go (and the reserve, once nothing carved from it is in use)."""
        with self._cond:
            self._free.clear()
            self._idle_bytes = 0
            self._reserve = None
