"""Array bytes between a process and hosts: by address or through shared-memory segments on this
machine, streams otherwise.

Used by the client (puts, fetches) and by hosts (copies to another slice's hosts: LocalSender).

On this machine (every host of the transfer listens on a loopback address), bytes move by
address (proto.cma, one copy): a put sends each host only its shards' headers, naming where each
lies in this process's memory, and the host reads them from there straight into the memory its
device buffers take over; a fetch names where the result lies in this process's memory, and each
host writes its shards from its device buffers straight into their regions there; a host's copy
to a host of this machine names where the shards lie in its device buffers. Where a shard is not
one contiguous run of the array's bytes (cut across rows), or the kernel does not let a host
reach this process's memory, the array goes through a segment of this process (proto.shm)
instead: a put copies it in once and the hosts copy their shards out of its mapping; a fetch's
hosts write into it and the result is a NumPy array over the mapping. Everything else (another
machine, PATHWAYS_SHARED_MEMORY=0, a host that cannot reach this process's /proc) moves the bytes
over the hosts' bulk channel (proto.bulk: plain TCP, one connection per shard, gRPC carrying only
the shards' headers and tickets), all hosts at once, straight between the sockets and the arrays.
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
from proto import cma as _cma
from proto import pathways_pb2 as pb
from proto import same_host as _same_host
from proto import shm as _shm
from proto import wire as _wire
from proto.chunk_codec import FramedWorkerStub
from proto.config import TransferConfig, from_env


log = logging.getLogger(__name__)

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
    `deadline(nbytes)` is an RPC's deadline. `value` must not change until the jobs are done
    (hosts of this machine may read it where it lies)."""
    addresses = {host: vslice.info.host_addresses[host] for host in host_groups}
    local = _same_host.segments_reach(list(addresses.values()))
    regions = (_same_host.direct_regions(value, host_groups) if local and _cma.available()
               else None)
    segment = None
    if regions is None and value.nbytes and local:
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
        address = addresses[host]
        if regions is not None and address not in _same_host.NOT_READABLE:
            if _same_host.put_direct(stub, address, spec, groups, regions, deadline(nbytes)):
                return None
        if segment is not None and address not in _same_host.UNREACHABLE:
            if _same_host.put_through(stub, address, spec, groups, segment, deadline(nbytes)):
                return None
        return stream_put(stub, spec, shards, deadline(nbytes), address=address)

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
        if len(errors) == parts and all(
                ONE_STREAM_ONLY in str(_same_host.runtime_error(e)) for e in errors):
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


class FetchTarget:
    """Where a fetch of one array lands, `value` either way: memory of this process the hosts
    write into by address (on this machine, proto.cma, when every shard's region is contiguous),
    else a segment of this process they write into (on this machine), else a NumPy array filled
    from streams. `indices`: the shards the fetch will ask for."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, addresses: Sequence[str],
                 indices: Sequence[_wire.Index] = ()) -> None:
        self.segment = None
        nbytes = math.prod(shape) * dtype.itemsize
        local = bool(nbytes) and _same_host.segments_reach(addresses)
        self._direct = local and _cma.available() and all(
            _wire.contiguous_offset(shape, i, dtype.itemsize) is not None for i in indices)
        if local and not self._direct:
            try:
                self.segment = _shm.POOL.take(nbytes)
            except OSError as exc:
                log.info("no shared-memory segment for a fetch of %d bytes (%s)", nbytes, exc)
        # Otherwise into warm memory: a past fetch's, or the reserve (proto.shm.reserve_memory).
        self.value = (self.segment.array(dtype, shape) if self.segment is not None
                      else _shm.HOST_BUFFERS.empty(shape, dtype))

    def request(self, request: pb.GetArrayRequest, address: str) -> pb.GetArrayRequest:
        """`request` asking the host at `address` to write into `value` by address, or into the
        segment, when it can."""
        if self._direct and address not in _same_host.NOT_READABLE:
            request.process_address = self.value.ctypes.data
            request.process_segment = _cma.identity()
        elif self.segment is not None and address not in _same_host.UNREACHABLE:
            request.shared_array = self.segment.reference
        return request

    def receive(self, stub, request: pb.GetArrayRequest, address: str, timeout: float) -> None:
        """Reads the requested shards from a host into `value` (streaming them if the host cannot
        reach this process's memory or segment)."""
        if request.process_address or request.shared_array:
            try:
                chunks = stub.GetArray(request, timeout=timeout)
                first = next(chunks, None)
                if first is None or first.shard.shared_array or first.shard.process_address:
                    _same_host.check_headers(
                        itertools.chain([first] if first else [], chunks), request)
                    return
                # A host that does not write into memory of ours (a simulated one) streams.
                self._assemble(itertools.chain([first], chunks))
                return
            except Exception as exc:
                mapped = _same_host.runtime_error(exc)
                if request.process_address and _cma.is_unreachable(mapped):
                    _same_host.mark_not_readable(address, mapped)
                elif request.shared_array and _shm.is_unreachable(mapped):
                    _same_host.mark_unreachable(address, mapped)
                else:
                    raise
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
_stream_pool_lock = threading.Lock()


def _streams() -> futures.ThreadPoolExecutor:
    global _stream_pool
    with _stream_pool_lock:
        if _stream_pool is None:
            _stream_pool = futures.ThreadPoolExecutor(STREAM_THREADS,
                                                      thread_name_prefix="shard-stream")
        return _stream_pool
