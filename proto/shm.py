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

import collections
import contextlib
import logging
import math
import mmap
import os
import re
import secrets
import stat
import threading
import time
from concurrent import futures

import numpy as np

from proto import buffers as _buffers
from proto.config import TransferConfig, from_env
from proto.errors import FailedPreconditionError, InvalidArgumentError

#: In the message of the error a receiver raises when it cannot open a segment (not a bad one):
#: the sender then streams the bytes instead.
SEGMENT_UNREACHABLE = "shared-memory segment unreachable"
log = logging.getLogger(__name__)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_REFERENCE = re.compile(r"([1-9][0-9]{0,9})/([0-9]{1,9})/(pathways-[0-9a-f]{32})")


def segments_available() -> bool:
    """Whether this process may hand arrays over through segments: memfd exists here and
    PATHWAYS_SHARED_MEMORY is not 0. Only for a peer on this machine: the caller checks that."""
    return os.environ.get("PATHWAYS_SHARED_MEMORY", "1") != "0" and hasattr(os, "memfd_create")


class _File:
    """An anonymous shared-memory file of this process (its pages stay allocated while open),
    mapped here once, for as long as it is open: mapping 256 MiB costs a fair part of a copy of
    it, so a file reused from the pool is not mapped again."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.name = f"pathways-{secrets.token_hex(16)}"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            os.posix_fallocate(self.fd, 0, nbytes)  # all pages in one call, not fault by fault
            self.map = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.reference = f"{os.getpid()}/{self.fd}/{self.name}"

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped with it
                self.map.close()
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
    mapping. Afterwards `release()` gives the file back to its pool (the transfer succeeded; a
    view still alive keeps the file out of the pool for good), `release_with_views()` gives it
    back once the last view made so far is gone (a fetch's result), and `discard()` closes it (a
    peer may still be using it).
    """

    def __init__(self, pool: SegmentPool, file: _File) -> None:
        self.pool, self._file = pool, file
        self.nbytes, self.reference = file.nbytes, file.reference
        self._views = 0
        self._give_when_unviewed = False
        self._lock = threading.Lock()

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The segment's bytes as a writable array of `shape` and `dtype` (no copy)."""
        with self._lock:
            self._views += 1
        return _buffers.lease(self._file.map, self.nbytes, dtype, shape, self._view_gone)

    def _view_gone(self) -> None:
        with self._lock:
            self._views -= 1
            give = self._views == 0 and self._give_when_unviewed
        if give:
            self.pool.give(self._file)

    def release(self) -> None:
        with self._lock:
            viewed = self._views > 0
        if viewed:  # a view is still alive: the file cannot be reused under it
            self._file.close()
        else:
            self.pool.give(self._file)

    def release_with_views(self) -> None:
        with self._lock:
            self._give_when_unviewed = True
            give = self._views == 0
        if give:
            self.pool.give(self._file)

    def discard(self) -> None:
        self._file.close()


#: Segments of this process (clients' puts and fetches, hosts' copies to hosts of this machine).
#: PATHWAYS_SHARED_MEMORY_POOL_BYTES bounds the idle ones (default 1 GiB).
POOL = SegmentPool(int(os.environ.get("PATHWAYS_SHARED_MEMORY_POOL_BYTES", 1 << 30)))
_SETTINGS = from_env(TransferConfig)
#: Memory a host's device buffers alias, reused once the arrays they backed are freed (and a
#: client's fetch results, once they are dropped).
HOST_BUFFERS = _buffers.BufferPool(_SETTINGS.host_buffer_pool_bytes)
_reserved = False  # HOST_BUFFERS' reserve was asked for in this process
_reserved_lock = threading.Lock()


def reserve_memory(nbytes: int) -> None:
    """Faults in `nbytes` for HOST_BUFFERS now, once per process (BufferPool.reserve): memory for
    the process's first transfers, made ready before them as XLA reserves device memory when it
    starts. Later calls return at once (a transfer that needs the reserve waits for it). Without
    the memory, the process goes on without a reserve."""
    global _reserved
    with _reserved_lock:
        if nbytes <= 0 or _reserved:
            return
        _reserved = True
    try:
        HOST_BUFFERS.reserve(nbytes, _SETTINGS.reserve_wait_s)
    except OSError as exc:
        log.warning("no reserve of %d bytes for transfers (%s)", nbytes, exc)


def open_segment(reference: str, nbytes: int, *, writable: bool = False) -> mmap.mmap:
    """Maps a peer's segment `reference` of exactly `nbytes` bytes (read-only unless `writable`),
    or returns the mapping of it made before: peers reuse their segments, and mapping one again
    costs a fair part of a copy of it. At most TransferConfig.peer_segment_cache_bytes of mappings
    are kept (least recently used first out).

    InvalidArgumentError unless the reference has the form a Segment gives and names a regular
    file of this user exactly `nbytes` long; FailedPreconditionError (with SEGMENT_UNREACHABLE)
    when it cannot be opened or is not a memfd of the name it gives: the peer's /proc is out of
    reach (another machine or PID namespace), or the peer is gone.
    """
    return _PEER_MAPS.get(reference, nbytes, writable)


class _PeerMappings:
    """Mappings of peers' segments, by reference (unique: its name is 128 random bits), kept up
    to `max_bytes`, and only while their peer holds them: every `check_s` seconds those whose
    file the peer no longer holds open (closed, or the peer is gone, SIGKILLed say) are dropped,
    so a peer's memory is not kept alive here. A mapping dropped while a view of it is alive goes
    with its last view."""

    def __init__(self, max_bytes: int, check_s: float) -> None:
        self.max_bytes, self.check_s = max_bytes, check_s
        self._checker: threading.Thread | None = None
        self._maps: collections.OrderedDict[tuple[str, bool], mmap.mmap] = (
            collections.OrderedDict())
        self._sizes: dict[tuple[str, bool], int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, reference: str, nbytes: int, writable: bool) -> mmap.mmap:
        key = (reference, writable)
        with self._lock:
            mapping = self._maps.get(key)
            if mapping is not None and mapping.closed:  # its user closed it: map it again
                del self._maps[key]
                self._bytes -= self._sizes.pop(key)
                mapping = None
            if mapping is not None:
                self._maps.move_to_end(key)
                size = self._sizes[key]
        if mapping is not None:
            if size != nbytes:
                raise InvalidArgumentError(f"shared-memory segment {reference!r} holds "
                                           f"{size} bytes, the array {nbytes}")
            return mapping
        mapping = _open_segment(reference, nbytes, writable=writable)
        if nbytes > self.max_bytes:
            return mapping
        evicted = []
        with self._lock:
            if key not in self._maps:
                self._maps[key], self._sizes[key] = mapping, nbytes
                self._bytes += nbytes
            if self._checker is None:
                self._checker = threading.Thread(target=self._check, daemon=True,
                                                 name="peer-segments")
                self._checker.start()
            while self._bytes > self.max_bytes:
                old_key, old = self._maps.popitem(last=False)
                self._bytes -= self._sizes.pop(old_key)
                evicted.append(old)
        for old in evicted:
            with contextlib.suppress(BufferError):
                old.close()
        return mapping

    def clear(self) -> None:
        """Drops every mapping kept."""
        self._drop(lambda key: True)

    def _drop(self, which) -> None:
        with self._lock:
            keys = [key for key in self._maps if which(key)]
            maps = [self._maps.pop(key) for key in keys]
            self._bytes -= sum(self._sizes.pop(key) for key in keys)
        for mapping in maps:
            with contextlib.suppress(BufferError):
                mapping.close()

    def _check(self) -> None:
        """Drops, every `check_s` s, mappings of files their peer no longer holds; ends when
        nothing is mapped (the next mapping starts it again)."""
        while True:
            time.sleep(self.check_s)
            self._drop(lambda key: not _held_by_peer(key[0]))
            with self._lock:
                if not self._maps:
                    self._checker = None
                    return


def _held_by_peer(reference: str) -> bool:
    """Whether the process a segment reference names still holds that file at that descriptor."""
    pid, fd, name = reference.split("/")
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"/memfd:{name} (deleted)"
    except OSError:
        return False


_PEER_MAPS = _PeerMappings(_SETTINGS.peer_segment_cache_bytes,
                            _SETTINGS.peer_segment_check_s)


def _open_segment(reference: str, nbytes: int, *, writable: bool = False) -> mmap.mmap:
    """Maps a peer's segment `reference` of exactly `nbytes` bytes (read-only unless `writable`);
    see `open_segment` for the errors."""
    local, size = open_peer_file(reference, writable=writable)
    try:
        if size != nbytes:
            raise InvalidArgumentError(f"shared-memory segment {reference!r} holds "
                                       f"{size} bytes, the array {nbytes}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(local, nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)
    finally:
        os.close(local)


def open_peer_file(reference: str, *, writable: bool = False) -> tuple[int, int]:
    """Opens the file a peer's segment reference names: (a descriptor of it, which the caller
    closes; its size). InvalidArgumentError unless the reference has the form a Segment gives and
    names a regular file of this user; FailedPreconditionError (with SEGMENT_UNREACHABLE) when
    it cannot be opened or is not a memfd of the name it gives: the peer's /proc is out of reach
    (another machine or PID namespace), or the peer is gone."""
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
    except BaseException:
        os.close(local)
        raise
    return local, info.st_size


class OpenSegments:
    """Peer segments a receiver maps while it copies from or into them (each reference is mapped
    once however many shards it holds, and kept mapped for the next transfer: `open_segment`).
    Copy out of the views before leaving the block: the peer reuses its segments."""

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
    once into memory of this process that no other array uses (warm memory of HOST_BUFFERS, when
    an array of that size was freed before)."""
    if take and data.flags.writeable:
        data.flags.writeable = False
        return data
    copy = HOST_BUFFERS.empty(data.shape, data.dtype)
    copy_into(copy, data)
    copy.flags.writeable = False
    return copy


#: Copies of at least this many bytes are split over COPY_THREADS threads (NumPy copies without
#: the GIL): one core copies at well under the memory's bandwidth.
PARALLEL_COPY_BYTES = _SETTINGS.parallel_copy_bytes
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
    bounds = [rows * i // parts for i in range(parts + 1)]
    jobs = [copiers().submit(np.copyto, target[a:b], source[a:b])
            for a, b in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()


def copiers() -> futures.ThreadPoolExecutor:
    """The COPY_THREADS threads big copies are split over (made on first use)."""
    global _copiers
    with _copiers_lock:
        if _copiers is None:
            _copiers = futures.ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="copy")
        return _copiers
