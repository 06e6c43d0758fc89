"""Shared-memory segments: array bytes handed between processes of one machine without a stream.

A segment is an anonymous memory file (memfd) of the process that made it, holding one whole array
row-major. Its reference, "PID/FD/NAME", lets another process of the same user on the machine open
it through /proc/PID/fd/FD and map it. A put writes the array into a segment of the sender (one
copy) and each receiving host copies its shards once out of the mapping into memory its device
buffers then take over (`device_copy`: the sender reuses its segments, so they are never aliased);
a fetch hands the hosts a segment of the client, into whose regions each host copies its shards
from its device buffers, and the client's result is a NumPy array over that mapping (one copy in
all). Segments come from a pool (`SegmentPool`): pages of shared memory written once are written
again at memcpy speed, fresh ones several times slower.

The file has no name in any directory: it lives exactly as long as some process holds it open or
mapped. A SIGKILLed sender or receiver therefore leaves nothing behind (no file of /dev/shm to reap),
which named shared-memory files cannot promise.

A receiver accepts a reference only when it names a memfd called "pathways-" and 32 hex digits,
owned by its own user, a regular file exactly as long as the array (`open_segment`): a peer cannot
make a host read or write anything else. Where /proc of the sender cannot be reached (another
machine, another PID namespace) opening fails with SEGMENT_UNREACHABLE in the message, and the
sender streams the bytes instead.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from concurrent import futures

import numpy as np

from proto.errors import FailedPreconditionError, InvalidArgumentError

#: In the message of the error a receiver raises when it cannot open a segment (not a bad one):
#: the sender then streams the bytes instead.
SEGMENT_UNREACHABLE = "shared-memory segment unreachable"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_REFERENCE = re.compile(r"([1-9][0-9]{0,9})/([0-9]{1,9})/(pathways-[0-9a-f]{32})")


def segments_available() -> bool:
    """Whether this process may hand arrays over through segments: memfd exists here and
    PATHWAYS_SHARED_MEMORY is not 0. Only for a peer on this machine: the caller checks that."""
    return os.environ.get("PATHWAYS_SHARED_MEMORY", "1") != "0" and hasattr(os, "memfd_create")


class _File:
    """An anonymous shared-memory file of this process (its pages stay allocated while open)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.name = f"pathways-{secrets.token_hex(16)}"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            os.posix_fallocate(self.fd, 0, nbytes)  # all pages in one call, not fault by fault
        except BaseException:
            os.close(self.fd)
            raise
        self.reference = f"{os.getpid()}/{self.fd}/{self.name}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SegmentPool:
    """Files of past segments kept for reuse, at most `max_bytes` of them idle.

    A fresh shared-memory file is slow to fill: the kernel hands out its pages one fault at a
    time, without huge pages, at a fraction of memcpy's speed on this kind of machine. A file whose
    pages were written once is filled again at memcpy speed, so segments come from here and go
    back after a transfer that succeeded (a failed one may still have a peer writing into it: its
    file is closed instead).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[_File]] = {}
        self._idle_bytes = 0
        self._lock = threading.RLock()  # give() may run from a finalizer, inside take()

    def take(self, nbytes: int) -> Segment:
        """A segment of exactly `nbytes` (> 0) bytes, mapped here."""
        if nbytes <= 0:
            raise ValueError("a shared-memory segment holds at least one byte")
        with self._lock:
            files = self._free.get(nbytes)
            file = files.pop() if files else None
            if file is not None:
                self._idle_bytes -= nbytes
        return Segment(self, file or _File(nbytes))

    def give(self, file: _File) -> None:
        """Takes back a file no peer is using; closes it when the pool is full."""
        with self._lock:
            if file.fd >= 0 and self._idle_bytes + file.nbytes <= self.max_bytes:
                self._free.setdefault(file.nbytes, []).append(file)
                self._idle_bytes += file.nbytes
                return
        file.close()

    def clear(self) -> None:
        """Closes every idle file."""
        with self._lock:
            files = [f for fs in self._free.values() for f in fs]
            self._free.clear()
            self._idle_bytes = 0
        for file in files:
            file.close()


class Segment:
    """A shared-memory file of this process mapped here, for one transfer.

    `reference` names it for a peer on this machine; `array(dtype, shape)` is a view of the
    mapping. Afterwards `release()` gives the file back to its pool (the transfer succeeded, the
    views are gone), `release_with_views()` gives it back once the last view made so far is gone
    (a fetch's result), and `discard()` closes it (a peer may still be using it).
    """

    def __init__(self, pool: SegmentPool, file: _File) -> None:
        self.pool, self._file = pool, file
        self.nbytes, self.reference = file.nbytes, file.reference
        try:
            self._map = mmap.mmap(file.fd, file.nbytes, flags=mmap.MAP_SHARED | _POPULATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            file.close()
            raise

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The segment's bytes as a writable array of `shape` and `dtype` (no copy)."""
        return np.frombuffer(self._map, dtype, count=math.prod(shape)).reshape(shape)

    def release(self) -> None:
        if self._unmap():
            self.pool.give(self._file)
        else:  # a view is still alive: the file cannot be reused under it
            self._file.close()

    def release_with_views(self) -> None:
        # Every NumPy view of the mapping holds the mmap object: when it goes, so do they.
        weakref.finalize(self._map, self.pool.give, self._file)
        self._map = None  # the views alone keep it

    def discard(self) -> None:
        self._unmap()
        self._file.close()

    def _unmap(self) -> bool:
        try:
            self._map.close()
            return True
        except BufferError:
            return False


#: Segments of this process (clients' puts and fetches, hosts' copies to hosts of this machine).
#: PATHWAYS_SHARED_MEMORY_POOL_BYTES bounds the idle ones (default 1 GiB).
POOL = SegmentPool(int(os.environ.get("PATHWAYS_SHARED_MEMORY_POOL_BYTES", 1 << 30)))


def open_segment(reference: str, nbytes: int, *, writable: bool = False) -> mmap.mmap:
    """Maps a peer's segment `reference` of exactly `nbytes` bytes (read-only unless `writable`).

    InvalidArgumentError unless the reference has the form a Segment gives and names a regular
    file of this user exactly `nbytes` long; FailedPreconditionError (with SEGMENT_UNREACHABLE)
    when it cannot be opened or is not a memfd of the name it gives: the peer's /proc is out of
    reach (another machine or PID namespace), or the peer is gone.
    """
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        raise InvalidArgumentError(f"shared-memory segment {reference!r} is not a runtime segment "
                                   f"reference")
    pid, fd, name = match.groups()
    try:
        local = os.open(f"/proc/{pid}/fd/{fd}",
                        (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPreconditionError(f"{SEGMENT_UNREACHABLE}: {reference} cannot be opened "
                                      f"({exc.strerror})") from None
    try:
        info = os.fstat(local)
        # What this descriptor is, read from our own /proc entry: no race with the peer's table.
        target = os.readlink(f"/proc/self/fd/{local}")
        if target != f"/memfd:{name} (deleted)":
            # Not what it names: a forged reference, or a peer whose process IDs are not ours
            # (another PID namespace on this machine). Either way nothing is read, and an honest
            # peer streams instead.
            raise FailedPreconditionError(f"{SEGMENT_UNREACHABLE}: {reference} is not the "
                                          f"runtime segment it names")
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise InvalidArgumentError(f"shared-memory segment {reference!r} is not a regular "
                                       f"file of this user")
        if info.st_size != nbytes:
            raise InvalidArgumentError(f"shared-memory segment {reference!r} holds "
                                       f"{info.st_size} bytes, the array {nbytes}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(local, nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)
    finally:
        os.close(local)


class OpenSegments:
    """Peer segments a receiver maps while it copies from or into them; each reference is mapped
    once however many shards it holds. Leaving the block drops the mappings (one still viewed is
    unmapped with its last view: copy out of the views before, the peer reuses its segments)."""

    def __init__(self, *, writable: bool = False) -> None:
        self._writable = writable
        self._maps: dict[str, mmap.mmap] = {}

    def array(self, reference: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The whole array of shape `shape` and `dtype` in segment `reference`, as a view."""
        nbytes = math.prod(shape) * dtype.itemsize
        mapping = self._maps.get(reference)
        if mapping is None:
            mapping = self._maps[reference] = open_segment(reference, nbytes,
                                                           writable=self._writable)
        elif len(mapping) != nbytes:
            raise InvalidArgumentError(f"shared-memory segment {reference!r} is named for arrays "
                                       f"of two sizes")
        view = np.frombuffer(mapping, dtype, count=math.prod(shape)).reshape(shape)
        if not self._writable:
            view.flags.writeable = False
        return view

    def close(self) -> None:
        for mapping in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still alive: unmapped with it
                mapping.close()
        self._maps.clear()

    def __enter__(self) -> OpenSegments:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a peer could not open a segment of ours (stream the bytes instead)."""
    return isinstance(exc, FailedPreconditionError) and SEGMENT_UNREACHABLE in str(exc)


def write_regions(reference: str, shape: tuple[int, ...], dtype: np.dtype, shards) -> list:
    """Copies `shards` ((index, array) pairs; device arrays are read through their host views)
    into their regions of the peer's segment `reference`, which must hold exactly the whole array
    of `shape` and `dtype`; returns the ArrayChunk headers that tell the peer they are there."""
    from proto import pathways_pb2 as pb
    from proto import wire as _wire

    headers = []
    with OpenSegments(writable=True) as segments:
        whole = segments.array(reference, np.dtype(dtype), tuple(shape))
        for index, data in shards:
            region = whole[(*_wire.as_slices(index), ...)]  # a view even of a 0-d array
            copy_into(region, data)
            headers.append(pb.ArrayChunk(shard=pb.ShardHeader(
                index=_wire.index_to_proto(index), nbytes=region.nbytes,
                shared_array=reference)))
        del whole, region
    return headers


def device_copy(data: np.ndarray, *, take: bool) -> np.ndarray:
    """`data` as a device buffer may take it over: JAX's CPU devices alias read-only NumPy arrays
    instead of copying them. With `take` (the caller hands over `data`: nothing else refers to its
    memory, and no other device gets it) a writable `data` is itself made read-only; anything else
    (a view of a peer's segment, whose pages the peer reuses; a second device's shard) is copied
    once into fresh memory of this process."""
    if take and data.flags.writeable:
        data.flags.writeable = False
        return data
    copy = aligned_empty(data.shape, data.dtype)
    copy_into(copy, data)
    copy.flags.writeable = False
    return copy


#: Alignment JAX's CPU client needs to alias host memory rather than copy it.
DEVICE_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array starting on a DEVICE_ALIGNMENT boundary (NumPy's own allocations
    guarantee 16 bytes), so that a device buffer may alias it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + DEVICE_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


#: Copies of at least this many bytes are split over COPY_THREADS threads (NumPy copies without
#: the GIL): one core copies at well under the memory's bandwidth.
PARALLEL_COPY_BYTES = 8 << 20
COPY_THREADS = max(1, min(8, os.cpu_count() or 1))
_copiers: futures.ThreadPoolExecutor | None = None
_copiers_lock = threading.Lock()


def copy_into(target: np.ndarray, source) -> None:
    """np.copyto(target, source), in blocks of rows on several threads when it is big."""
    source = np.asarray(source)
    rows = target.shape[0] if target.ndim else 0
    parts = min(COPY_THREADS, rows)
    if target.nbytes < PARALLEL_COPY_BYTES or parts < 2 or source.shape != target.shape:
        np.copyto(target, source)
        return
    global _copiers
    with _copiers_lock:
        if _copiers is None:
            _copiers = futures.ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="copy")
    bounds = [rows * i // parts for i in range(parts + 1)]
    jobs = [_copiers.submit(np.copyto, target[a:b], source[a:b])
            for a, b in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()
