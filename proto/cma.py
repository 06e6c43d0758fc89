"""Moving array bytes straight between the memories of two processes of one machine (Linux
cross-memory attach): puts, fetches and copies in a single copy.

Through a shared-memory segment (proto.shm) a put copies the array twice: the sender into its
segment, the receiver out of it into the memory its device buffers take over. Here the sender
names where each shard already lies in its own memory (ShardHeader.process_address) and the
receiver copies it from there straight into that memory with process_vm_readv(2): one copy, no
segment, nothing fresh to fault in on the sender's side. A fetch likewise names where the
caller's result lies (GetArrayRequest.process_address), and the host writes each shard from its
device buffer straight into its region there (process_vm_writev(2)).

Whose memory: every such header or request also names a segment of that process (`identity`, one
byte, made once per process), which the peer opens as any segment (proto.shm.open_peer_file: a
memfd of this user, of the random name the reference gives, held by that process). Only a
process holding that file knows its name, so the memory reached is that of the process that
asked, at its own word, never another's. The kernel adds its own check: a process may reach only
processes it could trace (same user; no Yama restriction in the way).

Where the kernel refuses (another user, a container without the calls, Yama's ptrace_scope), the
peer answers FailedPreconditionError with MEMORY_UNREACHABLE and the asking side moves the bytes
another way from then on. An address the asking process does not map is InvalidArgumentError.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading

import numpy as np

from proto import shm as _shm
from proto.config import TransferConfig, from_env
from proto.errors import FailedPreconditionError, InvalidArgumentError

#: In the message of the error a peer raises when the kernel does not let it reach the asking
#: process's memory: that process then moves the bytes another way.
MEMORY_UNREACHABLE = "process memory unreachable"
_SETTINGS = from_env(TransferConfig)
#: Moves of at least this many bytes are split over COPY_THREADS threads (as copies are:
#: proto.shm.copy_into), each a call of its own.
PARALLEL_MOVE_BYTES = _SETTINGS.parallel_copy_bytes
#: errno values that mean "not allowed here" rather than "a bad address".
_REFUSED = {errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ESRCH}


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load(name: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                     ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    call.restype = ctypes.c_ssize_t
    return call


_READV, _WRITEV = _load("process_vm_readv"), _load("process_vm_writev")
_identity: _shm.Segment | None = None
_identity_lock = threading.Lock()


def available() -> bool:
    """Whether this process may move arrays to and from peers of this machine by address: the
    calls exist here, shared memory is on (PATHWAYS_SHARED_MEMORY) and so are direct reads
    (PATHWAYS_PROCESS_MEMORY_READS). Only for a peer on this machine: the caller checks that."""
    return (_READV is not None and _WRITEV is not None and _shm.segments_available()
            and os.environ.get("PATHWAYS_PROCESS_MEMORY_READS",
                               str(_SETTINGS.process_memory_reads)) != "0")


def identity() -> str:
    """The reference of this process's identity segment (made on first use, kept for the
    process's life; a forked child makes its own): what a peer opens to know whose memory a
    header names."""
    global _identity
    with _identity_lock:
        if _identity is None or not _identity.reference.startswith(f"{os.getpid()}/"):
            _identity = _shm.SegmentPool(0).take(1)  # never given back
        return _identity.reference


def holder(reference: str) -> int:
    """The process that holds segment `reference` (checked as proto.shm.open_peer_file checks
    any segment; its errors)."""
    local, _ = _shm.open_peer_file(reference)
    os.close(local)
    return int(reference.split("/", 1)[0])


def read(reference: str, address: int, target: np.ndarray) -> None:
    """Fills `target` (a writable C-contiguous array) with the bytes at `address` of the process
    holding segment `reference`."""
    if not target.flags.c_contiguous or not target.flags.writeable:
        raise ValueError("a read from a peer's memory fills a writable, contiguous array")
    _move(_READV, holder(reference), address, target)


def write_regions(reference: str, address: int, shape: tuple[int, ...], dtype: np.dtype,
                  shards) -> list:
    """Writes `shards` ((index, array) pairs; device arrays are read through their host views)
    into their regions of a whole array of `shape` and `dtype` lying row-major at `address` of
    the process holding segment `reference`; returns the ArrayChunk headers that say so.
    InvalidArgumentError for a shard whose region is not contiguous there."""
    from proto import pathways_pb2 as pb
    from proto import wire as _wire

    pid = holder(reference)
    dtype = np.dtype(dtype)
    headers = []
    for index, data in shards:
        offset = _wire.contiguous_offset(shape, index, dtype.itemsize)
        if offset is None:
            raise InvalidArgumentError(f"shard {index} is not contiguous in an array of shape "
                                       f"{tuple(shape)}: it cannot be written by address")
        source = np.ascontiguousarray(np.asarray(data))  # a device buffer's view: no copy
        _move(_WRITEV, pid, address + offset, source)
        headers.append(pb.ArrayChunk(shard=pb.ShardHeader(
            index=_wire.index_to_proto(index), nbytes=source.nbytes,
            process_address=address + offset, process_segment=reference)))
    return headers


def _move(call, pid: int, remote: int, local: np.ndarray) -> None:
    """Reads (process_vm_readv) or writes (process_vm_writev) `local`'s bytes from or to `remote`
    in process `pid`, over several threads when they are many."""
    if call is None:
        raise FailedPreconditionError(f"{MEMORY_UNREACHABLE}: this platform cannot reach another "
                                      f"process's memory")
    nbytes = local.nbytes
    if nbytes == 0:
        return
    base = local.ctypes.data
    parts = min(_shm.COPY_THREADS, max(1, nbytes // max(1, PARALLEL_MOVE_BYTES)))
    if parts < 2:
        _move_range(call, pid, remote, base, nbytes)
        return
    bounds = [nbytes * i // parts for i in range(parts + 1)]
    jobs = [_shm.copiers().submit(_move_range, call, pid, remote + a, base + a, b - a)
            for a, b in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()


def _move_range(call, pid: int, remote: int, local: int, nbytes: int) -> None:
    """One range of `_move`, call after call until all of it moved (the kernel may stop short)."""
    done = 0
    while done < nbytes:
        here = _IoVec(local + done, nbytes - done)
        there = _IoVec(remote + done, nbytes - done)
        moved = call(pid, ctypes.byref(here), 1, ctypes.byref(there), 1, 0)
        if moved <= 0:
            code = ctypes.get_errno() if moved < 0 else errno.EFAULT
            if code in _REFUSED:
                raise FailedPreconditionError(
                    f"{MEMORY_UNREACHABLE}: the memory of process {pid} cannot be reached from "
                    f"here ({os.strerror(code)})")
            raise InvalidArgumentError(f"{nbytes - done} bytes at {remote + done:#x} of the "
                                       f"peer process cannot be reached ({os.strerror(code)})")
        done += moved


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a peer may not reach this process's memory (move the bytes another
    way) or cannot open its identity segment."""
    return isinstance(exc, FailedPreconditionError) and (
        MEMORY_UNREACHABLE in str(exc) or _shm.is_unreachable(exc))
