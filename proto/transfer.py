"""Array bytes between a process and hosts: shared-memory segments on this machine, streams otherwise.

Used by the client (puts, fetches) and by hosts (copies to another slice's hosts: SegmentSender).

A put of an array whose hosts all listen on a loopback address copies the array once into a
segment of this process (proto.shm) and sends each host only its shards' headers naming it; the
hosts copy their shards from the mapping into their device buffers. A fetch hands the hosts one
segment as long as the array; each copies its shards from its device buffers into their regions,
and the result is a NumPy array over the mapping. Everything else (another machine,
PATHWAYS_SHARED_MEMORY=0, a host that cannot reach this process's /proc) moves the bytes over the
hosts' bulk channel (proto.bulk: plain TCP, one connection per shard, gRPC carrying only the
shards' headers and tickets), all hosts at once, straight between the sockets and the arrays.
Empty and small transfers (TransferConfig.bulk_min_bytes), hosts without a bulk port (simulated
ones) and a port that refuses connections (nothing sent yet) stream the bytes inside gRPC
messages instead: a put one stream per host (or per shard: ArrayChunk.parts), a fetch one stream
per shard (assembled in place in the result where the shard's region of it is contiguous).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures

import numpy as np

from proto import bulk as _bulk
from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from proto import shm as _shm
from proto import wire as _wire
from proto.chunk_codec import FramedWorkerStub
from proto.config import TransferConfig, from_env
from proto.errors import InvalidArgumentError, from_rpc_error


log = logging.getLogger(__name__)

#: Hosts (addresses) that could not open a segment of this process: streamed to from then on.
_UNREACHABLE: set[str] = set()
_UNREACHABLE_LOCK = threading.Lock()


def _segments_reach(addresses: Sequence[str]) -> bool:
    """Whether segments of this process may carry an array to or from all of these hosts."""
    if not _shm.segments_available():
        return False
    with _UNREACHABLE_LOCK:
        return all(_rpc.is_loopback(a) and a not in _UNREACHABLE for a in addresses)


def _mark_unreachable(address: str, exc: BaseException) -> None:
    with _UNREACHABLE_LOCK:
        if address not in _UNREACHABLE:
            log.info("host %s cannot open this process's shared memory (%s): streaming to it",
                     address, exc)
            _UNREACHABLE.add(address)


class _Countdown:
    """Runs `done` once `count` jobs have called `tick` (closing a segment after its last put)."""

    def __init__(self, count: int, done: Callable[[], None]) -> None:
        self._left, self._done, self._lock = count, done, threading.Lock()
        if count == 0:
            done()

    def tick(self, _=None) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._done()


def put_jobs(client, value: np.ndarray, spec: pb.ArraySpec, vslice,
             host_groups: dict[int, list[tuple[_wire.Index, list[int]]]],
             call: Callable, deadline: Callable[[int], float]) -> list[futures.Future]:
    """Starts putting `value` on the hosts of `host_groups` (host -> its distinct shards) of
    `vslice` (a runtime.client VirtualSlice), on `client.transfer_pool`; returns a job per host.
    `call(client, vslice, host, fn)` runs fn on the host's stub, mapping errors;
    `deadline(nbytes)` is an RPC's deadline."""
    addresses = {host: vslice.info.host_addresses[host] for host in host_groups}
    segment = None
    if value.nbytes and _segments_reach(list(addresses.values())):
        try:
            segment = _shm.POOL.take(value.nbytes)
            _shm.copy_into(segment.array(value.dtype, value.shape), value)
        except OSError as exc:  # no memory for it: stream instead
            log.info("no shared-memory segment for a put of %d bytes (%s)", value.nbytes, exc)
            if segment is not None:
                segment.discard()
            segment = None

    def put_host(stub, host, groups):
        shards = [(index, ps, value[_wire.as_slices(index)]) for index, ps in groups]
        nbytes = sum(s[2].nbytes for s in shards)
        if segment is not None and addresses[host] not in _UNREACHABLE:
            if _put_through(stub, addresses[host], spec, groups, segment, deadline(nbytes)):
                return None
        return stream_put(stub, spec, shards, deadline(nbytes), address=addresses[host])

    jobs = [client.transfer_pool.submit(call, client, vslice, host,
                                lambda stub, h=host, g=groups: put_host(stub, h, g))
            for host, groups in host_groups.items()]
    if segment is not None:
        def finish() -> None:  # reusable only if no host may still be reading it
            ok = all(not job.cancelled() and job.exception() is None for job in jobs)
            segment.release() if ok else segment.discard()

        countdown = _Countdown(len(jobs), finish)
        for job in jobs:
            job.add_done_callback(countdown.tick)
    return jobs


#: What a host that takes a put in one stream only says to one in several (ArrayChunk.parts).
ONE_STREAM_ONLY = "this host takes a put in one stream"
_ONE_STREAM: weakref.WeakSet = weakref.WeakSet()

_SETTINGS = from_env(TransferConfig)

#: A host's shards of a put stream in parallel, one stream per shard (at most this many), once
#: they hold at least PARALLEL_STREAM_BYTES in all.
MAX_PUT_STREAMS = _SETTINGS.max_put_streams
PARALLEL_STREAM_BYTES = _SETTINGS.parallel_stream_bytes


def stream_put(stub, spec: pb.ArraySpec, shards: Sequence[tuple], timeout: float, *,
               address: str = "", part: tuple[int, int] = (0, 0)) -> None:
    """Puts a host's shards ((index, mesh positions, data) triples) of an array on the host at
    `address`: over its bulk channel (proto.bulk) when it has one and they are big enough;
    otherwise over gRPC, one stream per shard (up to MAX_PUT_STREAMS, ArrayChunk.parts), all at
    once, so that a sharded array's bytes use several connections' worth of threads; one stream
    when they are few or small. With `part` = (parts, put), these shards are one part of a put
    other senders make the rest of (runtime.worker.copy_plan): one stream, so marked. Raises the
    first stream's error (the host fails the others)."""
    nbytes = sum(data.nbytes for _, _, data in shards)
    if _bulk.moved(stub, address, nbytes, timeout,
                   lambda port: _bulk.put(stub, address, port, spec, shards, timeout, part)):
        return
    # A stub that encodes chunks itself sends views of the shards (proto.chunk_codec).
    views = isinstance(stub, FramedWorkerStub)
    if part[0] > 1:
        stub.PutArray(_wire.iter_chunks(spec, shards, part[0], put=part[1], views=views),
                      timeout=timeout)
        return
    parts = min(len(shards), MAX_PUT_STREAMS)
    if parts < 2 or nbytes < PARALLEL_STREAM_BYTES or stub in _ONE_STREAM:
        stub.PutArray(_wire.iter_chunks(spec, shards, views=views), timeout=timeout)
        return
    groups = [shards[i::parts] for i in range(parts)]
    errors: list[BaseException] = []
    put = secrets.randbits(63) + 1  # the streams of this put, told from any other (ArrayChunk.put)

    def one(group) -> None:
        try:
            stub.PutArray(_wire.iter_chunks(spec, group, parts, put=put, views=views),
                          timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    # Threads of their own, not a bounded pool: the host holds each stream until all arrive.
    threads = [threading.Thread(target=one, args=(g,), name="put-stream", daemon=True)
               for g in groups[1:]]
    for thread in threads:
        thread.start()
    one(groups[0])
    for thread in threads:
        thread.join()  # each stream carries its RPC's deadline
    if errors:
        if all(ONE_STREAM_ONLY in str(_mapped(e)) for e in errors) and len(errors) == parts:
            _ONE_STREAM.add(stub)  # a host that takes puts in one stream only (simulated)
            stub.PutArray(_wire.iter_chunks(spec, shards, views=views), timeout=timeout)
            return
        raise errors[0]


class Regions:
    """Regions of an array (a NumPy array, or a JAX array all of whose shards are on this host)
    as NumPy arrays, for streaming: a region that is one of the array's shards is a view of its
    device buffer (no copy); any other is cut from the whole array, gathered once."""

    def __init__(self, value) -> None:
        self.value = value
        self._whole: np.ndarray | None = value if isinstance(value, np.ndarray) else None
        self._blocks = {} if self._whole is not None else _wire.distinct_blocks(value)
        self._lock = threading.Lock()  # the whole is gathered once, whichever thread asks

    def get(self, index: _wire.Index) -> np.ndarray:
        """The region `index` ((start, stop) per dimension) of the array."""
        block = self._blocks.get(index)
        if block is not None:
            return np.asarray(block)
        with self._lock:
            if self._whole is None:
                self._whole = np.asarray(self.value)
        return self._whole[_wire.as_slices(index)]


def _put_through(stub, address: str, spec: pb.ArraySpec, groups, segment: _shm.Segment,
                 timeout: float, part: tuple[int, int] = (0, 0)) -> bool:
    """Puts shards ((index, mesh positions) pairs) held in `segment` on the host at `address`;
    False (nothing stored) when that host cannot open segments of this process."""
    try:
        stub.PutArray(iter(_shared_headers(spec, groups, segment.reference, part)),
                      timeout=timeout)
        return True
    except Exception as exc:
        mapped = _mapped(exc)
        if not _shm.is_unreachable(mapped):
            raise
        _mark_unreachable(address, mapped)
        return False


class SegmentSender:
    """A host's copy of one array to hosts of another slice: to those on this machine through one
    segment holding the array (filled once, straight from the device buffers, when the first such
    host is sent to); `send` says False for the others (the caller streams to them)."""

    def __init__(self, value) -> None:
        self.value = value
        self.segment: _shm.Segment | None = None
        self._failed = False  # no segment could be made: stream to every host
        self._lock = threading.Lock()  # hosts are sent to from several threads at once

    def send(self, stub, address: str, spec: pb.ArraySpec, groups, timeout: float,
             part: tuple[int, int] = (0, 0)) -> bool:
        """Puts shards ((index, mesh positions) pairs) of the array on the host at `address`
        through the segment (as one `part` of a put, see stream_put); False when that path is
        not open. Only the blocks this host holds are written into the segment."""
        if not self.value.nbytes or not _segments_reach([address]):
            return False
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
        return _put_through(stub, address, spec, groups, self.segment, timeout, part)

    def close(self, succeeded: bool) -> None:
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


def _mapped(exc: BaseException) -> BaseException:
    """The runtime error a gRPC error stands for (itself otherwise)."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc) or exc
    return exc


def _shared_headers(spec: pb.ArraySpec, shards, reference: str,
                    part: tuple[int, int] = (0, 0)) -> list[pb.ArrayChunk]:
    """One message per shard ((index, mesh positions) pairs) naming its region of the segment;
    `spec` (and `part`, see stream_put) on the first."""
    itemsize = _wire.dtype_from_name(spec.dtype).itemsize
    messages = []
    for index, positions in shards:
        nbytes = math.prod(_wire.shard_shape(index)) * itemsize
        header = pb.ShardHeader(index=_wire.index_to_proto(index), nbytes=nbytes,
                                mesh_positions=positions, shared_array=reference)
        message = pb.ArrayChunk(shard=header)
        if not messages:
            message.spec.CopyFrom(spec)
            _wire.mark_part(message, part)
        messages.append(message)
    return messages


class FetchTarget:
    """Where a fetch of one array lands: a segment of this process the hosts write into (on this
    machine) or a NumPy array filled from streams; `value` is the array either way."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, addresses: Sequence[str]) -> None:
        self.segment = None
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes and _segments_reach(addresses):
            try:
                self.segment = _shm.POOL.take(nbytes)
            except OSError as exc:
                log.info("no shared-memory segment for a fetch of %d bytes (%s)", nbytes, exc)
        # Streamed: into warm memory of a past fetch (a fresh array's pages fault in on the way).
        self.value = (self.segment.array(dtype, shape) if self.segment is not None
                      else _shm.HOST_BUFFERS.empty(shape, dtype))

    def request(self, request: pb.GetArrayRequest, address: str) -> pb.GetArrayRequest:
        """`request` asking the host at `address` to write into the segment, when there is one."""
        if self.segment is not None and address not in _UNREACHABLE:
            request.shared_array = self.segment.reference
        return request

    def receive(self, stub, request: pb.GetArrayRequest, address: str, timeout: float) -> None:
        """Reads the requested shards from a host into `value` (streaming them if the host cannot
        reach the segment)."""
        if request.shared_array:
            try:
                chunks = stub.GetArray(request, timeout=timeout)
                first = next(chunks, None)
                if first is None or first.shard.shared_array:
                    _check_headers(itertools.chain([first] if first else [], chunks), request)
                    return
                # A host that does not write into segments (a simulated one) streams instead.
                self._assemble(itertools.chain([first], chunks))
                return
            except Exception as exc:
                mapped = _mapped(exc)
                if not _shm.is_unreachable(mapped):
                    raise
                _mark_unreachable(address, mapped)
                request = pb.GetArrayRequest(array_id=request.array_id, shards=request.shards,
                                             timeout_s=request.timeout_s,
                                             after_sequence=request.after_sequence)
        if not _bulk.moved(stub, address, self._bulk_nbytes(request), timeout,
                           lambda port: _bulk.fetch(stub, address, port, request, self.value,
                                                    timeout)):
            self._stream(stub, request, timeout)

    def _bulk_nbytes(self, request: pb.GetArrayRequest) -> int:
        """The bytes a read asks for (all of `value`'s when it names no shards)."""
        if not request.shards:
            return self.value.nbytes
        return sum(math.prod(_wire.shard_shape(_wire.index_from_proto(i)))
                   for i in request.shards) * self.value.itemsize

    def _stream(self, stub, request: pb.GetArrayRequest, timeout: float) -> None:
        """Streams the shards: the first shard alone (that read waits for the array to be
        computed, holding one of the host's threads), then one stream per remaining shard, all at
        once, each assembled in place in `value`."""
        first = pb.GetArrayRequest()
        first.CopyFrom(request)
        if len(request.shards) < 2:
            self._assemble(stub.GetArray(request, timeout=timeout))
            return
        del first.shards[1:]
        self._assemble(stub.GetArray(first, timeout=timeout))
        rest = []
        for index in request.shards[1:]:
            one = pb.GetArrayRequest(array_id=request.array_id, timeout_s=request.timeout_s,
                                     after_sequence=request.after_sequence, shards=[index])
            rest.append(_streams().submit(
                lambda r=one: self._assemble(stub.GetArray(r, timeout=timeout))))
        for job in rest:  # each carries its RPC's deadline
            job.result()

    def _assemble(self, chunks) -> None:
        _, shards = _wire.assemble_chunks(chunks, self.value.dtype, target=self.value)
        for shard in shards:
            if not np.may_share_memory(shard.data, self.value):  # not assembled in place
                self.value[_wire.as_slices(shard.index)] = shard.data

    def close(self, succeeded: bool) -> None:
        """After the reads: the segment goes back to the pool once `value` (and every view of
        it) is gone; after a failure it is closed (a host may still be writing into it)."""
        if self.segment is not None:
            self.segment.release_with_views() if succeeded else self.segment.discard()


#: Threads streaming the second and later shards of a host's part of a fetch.
STREAM_THREADS = _SETTINGS.stream_threads
_stream_pool: futures.ThreadPoolExecutor | None = None


def _streams() -> futures.ThreadPoolExecutor:
    global _stream_pool
    with _UNREACHABLE_LOCK:
        if _stream_pool is None:
            _stream_pool = futures.ThreadPoolExecutor(STREAM_THREADS,
                                                      thread_name_prefix="shard-stream")
        return _stream_pool


def _check_headers(chunks, request: pb.GetArrayRequest) -> None:
    """A host's reply to a read through a segment: a header per shard asked for, no data."""
    wanted = {_wire.index_from_proto(i) for i in request.shards}
    written = set()
    for chunk in chunks:
        if chunk.data or not chunk.HasField("shard") or (
                chunk.shard.shared_array != request.shared_array):
            raise InvalidArgumentError("a host answered a shared-memory read with data")
        written.add(_wire.index_from_proto(chunk.shard.index))
    if wanted and written != wanted:
        raise InvalidArgumentError(f"a host wrote shards {sorted(written)} of {sorted(wanted)}")
