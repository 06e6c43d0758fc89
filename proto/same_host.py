"""Array bytes between processes of one machine: by address (proto.cma) or through shared-memory
segments (proto.shm): proto.transfer's paths to peers on this machine, and which peers they
reach.

A peer that cannot open a segment of this process is marked `UNREACHABLE`, one that cannot reach
its memory `NOT_READABLE` (another PID namespace, another user, Yama's ptrace_scope): the bytes
to and from it take the next path from then on.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np

from proto import cma as _cma
from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from proto import shm as _shm
from proto import wire as _wire
from proto.errors import InvalidArgumentError, from_rpc_error

log = logging.getLogger(__name__)

#: Hosts (addresses) that could not open a segment of this process: streamed to from then on.
UNREACHABLE: set[str] = set()
#: Hosts (addresses) that cannot reach this process's memory (proto.cma): puts and fetches go
#: another way.
NOT_READABLE: set[str] = set()
_LOCK = threading.Lock()


def segments_reach(addresses: Sequence[str]) -> bool:
    """Whether segments of this process may carry an array to or from all of these hosts."""
    if not _shm.segments_available():
        return False
    with _LOCK:
        return all(_rpc.is_loopback(a) and a not in UNREACHABLE for a in addresses)


def mark_unreachable(address: str, exc: BaseException) -> None:
    with _LOCK:
        if address not in UNREACHABLE:
            log.info("host %s cannot open this process's shared memory (%s): streaming to it",
                     address, exc)
            UNREACHABLE.add(address)


def mark_not_readable(address: str, exc: BaseException) -> None:
    with _LOCK:
        if address not in NOT_READABLE:
            log.info("host %s cannot reach this process's memory (%s): moving bytes to and from "
                     "it another way", address, exc)
            NOT_READABLE.add(address)


def direct_regions(value: np.ndarray, host_groups) -> dict[_wire.Index, np.ndarray] | None:
    """Each distinct shard's region of `value`, when every one is contiguous in memory (hosts of
    this machine may then read them where they lie: proto.cma); None otherwise (an empty array,
    shards cut across rows)."""
    if not value.nbytes:
        return None
    regions = {}
    for groups in host_groups.values():
        for index, _ in groups:
            region = value[(*_wire.as_slices(index), ...)]
            if not region.flags.c_contiguous:
                return None
            regions[index] = region
    return regions


def put_direct(stub, address: str, spec: pb.ArraySpec, groups,
                regions: dict[_wire.Index, np.ndarray], timeout: float,
                part: tuple[int, int] = (0, 0)) -> bool:
    """Puts shards ((index, mesh positions) pairs) on the host at `address` by address (as one
    `part` of a put, see stream_put): it reads each from its region of this process's memory
    (`regions`, see proto.cma); False (nothing stored) when it may not read this process's
    memory (it gets the bytes another way)."""
    identity = _cma.identity()
    return _put_named(stub, address, spec, groups, lambda index: {
        "process_address": regions[index].ctypes.data, "process_segment": identity},
        timeout, part, _cma.is_unreachable, mark_not_readable)


def put_through(stub, address: str, spec: pb.ArraySpec, groups, segment: _shm.Segment,
                timeout: float, part: tuple[int, int] = (0, 0)) -> bool:
    """Puts shards ((index, mesh positions) pairs) held in `segment` on the host at `address`;
    False (nothing stored) when that host cannot open segments of this process."""
    return _put_named(stub, address, spec, groups, lambda _: {"shared_array": segment.reference},
                      timeout, part, _shm.is_unreachable, mark_unreachable)


def _put_named(stub, address: str, spec: pb.ArraySpec, groups,
               where: Callable[[_wire.Index], dict], timeout: float, part: tuple[int, int],
               refused: Callable[[BaseException], bool],
               mark: Callable[[str, BaseException], None]) -> bool:
    """Puts shards whose headers only say where their bytes lie (`where`, see `headers`); False
    (nothing stored, `mark` told) when the host answers that it cannot reach them there."""
    try:
        stub.PutArray(iter(headers(spec, groups, where, part)), timeout=timeout)
        return True
    except Exception as exc:
        error = runtime_error(exc)
        if not refused(error):
            raise
        mark(address, error)
        return False


class LocalSender:
    """A host's copy of one array to hosts of another slice on this machine: each reads the
    shards it wants straight from the device buffers here (proto.cma) when they are whole blocks
    of the array; otherwise (or where the kernel refuses) through one segment holding the array,
    filled once, straight from the device buffers, when the first such host is sent to. `send`
    says False for hosts elsewhere (the caller streams to them)."""

    def __init__(self, value) -> None:
        self.value = value
        self.segment: _shm.Segment | None = None
        self._failed = False  # no segment could be made: stream to every host
        self._lock = threading.Lock()  # hosts are sent to from several threads at once
        self._blocks: dict[_wire.Index, np.ndarray] | None = None

    def send(self, stub, address: str, spec: pb.ArraySpec, groups, timeout: float,
             part: tuple[int, int] = (0, 0)) -> bool:
        """Puts shards ((index, mesh positions) pairs) of the array on the host at `address`
        (as one `part` of a put, see stream_put); False when no path of this machine is open.
        Only the blocks this host holds are read, or written into the segment."""
        if not self.value.nbytes or not segments_reach([address]):
            return False
        regions = self._readable(groups) if address not in NOT_READABLE else None
        if regions is not None and put_direct(stub, address, spec, groups, regions, timeout,
                                               part):
            return True
        with self._lock:
            if self.segment is None and not self._failed:
                try:
                    self.segment = segment_holding(self.value)
                except OSError as exc:
                    log.info("no shared-memory segment for a copy of %d bytes (%s)",
                             self.value.nbytes, exc)
                    self._failed = True
            if self.segment is None:
                return False
        return put_through(stub, address, spec, groups, self.segment, timeout, part)

    def _readable(self, groups) -> dict[_wire.Index, np.ndarray] | None:
        """The shards of `groups` as host views of this host's device buffers (or of the NumPy
        array), when each is a whole block of it and contiguous; None otherwise."""
        if not _cma.available():
            return None
        if isinstance(self.value, np.ndarray):
            regions = {index: self.value[(*_wire.as_slices(index), ...)] for index, _ in groups}
        else:
            with self._lock:
                if self._blocks is None:
                    self._blocks = {index: np.asarray(block) for index, block in
                                    _wire.distinct_blocks(self.value).items()}
            regions = {index: self._blocks.get(index) for index, _ in groups}
        if any(r is None or not r.flags.c_contiguous for r in regions.values()):
            return None
        return regions

    def close(self, succeeded: bool) -> None:
        self._blocks = None
        if self.segment is not None:
            self.segment.release() if succeeded else self.segment.discard()


def segment_holding(value) -> _shm.Segment:
    """A segment of the pool holding `value` (a NumPy array, or a JAX array all of whose shards
    are on this host: each distinct shard copied once, straight from its device buffer)."""
    dtype = np.dtype(value.dtype)
    segment = _shm.POOL.take(value.nbytes)
    try:
        whole = segment.array(dtype, tuple(value.shape))
        if isinstance(value, np.ndarray):
            _shm.copy_into(whole, value)
        else:
            for block, data in _wire.distinct_blocks(value).items():
                _shm.copy_into(whole[(*(slice(a, b) for a, b in block), ...)], data)
        del whole
    except BaseException:
        segment.discard()
        raise
    return segment


def runtime_error(exc: BaseException) -> BaseException:
    """The runtime error a gRPC error stands for (itself otherwise)."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc) or exc
    return exc


def headers(spec: pb.ArraySpec, shards, where: Callable[[_wire.Index], dict],
             part: tuple[int, int] = (0, 0)) -> list[pb.ArrayChunk]:
    """One message per shard ((index, mesh positions) pairs), its header saying where its bytes
    lie (`where(index)`: ShardHeader fields); `spec` (and `part`, see stream_put) on the first."""
    itemsize = _wire.dtype_from_name(spec.dtype).itemsize
    messages = []
    for index, positions in shards:
        nbytes = math.prod(_wire.shard_shape(index)) * itemsize
        header = pb.ShardHeader(index=_wire.index_to_proto(index), nbytes=nbytes,
                                mesh_positions=positions, **where(index))
        message = pb.ArrayChunk(shard=header)
        if not messages:
            message.spec.CopyFrom(spec)
            _wire.mark_part(message, part)
        messages.append(message)
    return messages


def check_headers(chunks, request: pb.GetArrayRequest) -> None:
    """A host's reply to a read through a segment: a header per shard asked for, no data."""
    wanted = {_wire.index_from_proto(i) for i in request.shards}
    written = set()
    for chunk in chunks:
        if chunk.data or not chunk.HasField("shard") or (
                chunk.shard.shared_array != request.shared_array) or (
                chunk.shard.process_segment != request.process_segment):
            raise InvalidArgumentError("a host answered a read into this process's memory with "
                                       "data")
        written.add(_wire.index_from_proto(chunk.shard.index))
    if wanted and written != wanted:
        raise InvalidArgumentError(f"a host wrote shards {sorted(written)} of {sorted(wanted)}")
