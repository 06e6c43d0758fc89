"""The data plane of a host: puts of announced arrays (streamed in, through shared-memory
segments or over the bulk channel: runtime.worker.bulk) and reads of stored ones. A component of
Worker (runtime.worker.worker), built with what it uses of the host: its store, its announcements
(runtime.worker.announced), its slices' meshes and the receipt of its island's order."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto import cma as _cma
from proto import shm as _shm
from proto import wire as _wire
from proto.errors import (STORE, DeadlineExceededError, ExecutionError, FailedPreconditionError,
                          InvalidArgumentError, NotFoundError, PathwaysError)
from runtime.worker.announced import Announcements, check_as_announced
from runtime.worker.bulk import BulkListener, Incoming
from runtime.worker.defaults import (ANNOUNCE_TIMEOUT_S, CALLER_CHECK_S, MAX_GET_TIMEOUT_S,
                                     SLICE_TIMEOUT_S)
from runtime.worker.put_parts import PutParts
from runtime.worker.store import ArrayStore, describe_layout


class DataPlane:
    """Put and get for host `island`.`host`: arrays go into and come out of `store`; a put must
    have been announced (`announcements`, used under the host's condition `cond`, which is
    notified as announcements come); `mesh(slice_id, timeout)` gives a slice's mesh once it is
    defined, `wait_received(sequence, timeout, active)` waits for the island's order to reach a
    sequence number (runtime.worker.worker)."""

    def __init__(self, island: int, host: int, *, cond: threading.Condition, store: ArrayStore,
                 announcements: Announcements,
                 mesh: Callable[[int, float], tuple[Mesh, pb.SliceInfo]],
                 wait_received: Callable[[int, float, Callable[[], bool]], None]) -> None:
        self.island, self.host = island, host
        self._cond = cond
        self.store = store
        self.announcements = announcements
        self.mesh = mesh
        self.wait_received = wait_received
        self._put_parts = PutParts(self)  # puts arriving in several streams
        self.bulk: BulkListener | None = None  # the host's bulk channel (create_worker_server)

    def put(self, chunks: Iterator[pb.ArrayChunk], timeout: float = SLICE_TIMEOUT_S) -> int:
        """Stores an array streamed in as chunks; returns the bytes received.

        Only an array the controller announced to this host (an Expect instruction), with the spec
        it announced, and only until it holds its data: anything else is refused
        (FailedPreconditionError; InvalidArgumentError for another spec), so every byte a host
        stores belongs to an array the controller accounts for and frees. Waits up to `timeout` s
        for the announcement and the definition of the array's slice."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            raise InvalidArgumentError("empty array stream")
        if not first.HasField("spec"):
            raise InvalidArgumentError("array stream does not start with its spec")
        array_id = first.spec.array_id
        if first.error:  # the sender's array failed, or (from the controller) its island was lost
            self._fail_incoming(array_id, ExecutionError(first.error))
            return 0
        if first.parts > 1:  # one of several streams of this host's shards
            return self._put_parts.put(first, chunks, timeout)
        announced = self._claim(array_id, min(timeout, ANNOUNCE_TIMEOUT_S))
        try:
            check_as_announced(first.spec, announced)
            return self._store_put(announced, first, chunks, timeout)
        finally:
            self._release(array_id)

    def _release(self, array_id: int) -> None:
        """A claimed put is over: the array may be claimed again unless it was stored."""
        with self._cond:
            self.announcements.release(array_id)

    def _fail_incoming(self, array_id: int, error: PathwaysError) -> None:
        """An announced array will not come: its entry fails (readers get `error`). One not
        announced yet (the announcement may still be on its way) fails on arrival; one that
        already holds its data, or was deleted, is left alone."""
        with self._cond:
            self.announcements.fail(array_id, error)

    def _claim(self, array_id: int, timeout: float) -> pb.ArraySpec:
        """The announced spec of an array about to be put, once announced (waiting up to
        `timeout` s); no other stream may put it meanwhile."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.announcements.spec(array_id) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break  # claim says why
                self._cond.wait(left)
            return self.announcements.claim(array_id, f"{self.island}.{self.host}")

    def _settle(self, array_id: int, store: Callable[[], None]) -> None:
        """Runs `store` for a claimed array unless it was deleted meanwhile; no longer announced
        afterwards (a second put is refused)."""
        with self._cond:
            if not self.announcements.arrived(array_id, store):
                raise FailedPreconditionError(f"array {array_id} was deleted while it was put")

    def _store_put(self, spec: pb.ArraySpec, first: pb.ArrayChunk,
                   chunks: Iterator[pb.ArrayChunk], timeout: float) -> int:
        with _shm.OpenSegments() as segments, contextlib.ExitStack() as stack:
            bulk = None if self.bulk is None else stack.enter_context(self.bulk.incoming(
                time.monotonic() + timeout, f"a put of array {spec.array_id}"))
            return self._place_put(spec, *self._receive_shards(spec, first, chunks, timeout,
                                                               segments, bulk))

    def _receive_shards(self, spec: pb.ArraySpec, first: pb.ArrayChunk,
                        chunks: Iterator[pb.ArrayChunk], timeout: float,
                        segments: _shm.OpenSegments, bulk: Incoming | None = None) -> tuple:
        """(mesh, slice info, the sharding's shards, the shards of a put's stream), once the
        array's slice is defined here (waiting up to `timeout` s) and the shards sent over the
        bulk channel arrived."""
        mesh, info = self.mesh(spec.sharding.slice_id, min(timeout, SLICE_TIMEOUT_S))
        shape = tuple(spec.shape)
        expected = dict(_wire.slice_shard_groups(shape, info, spec.sharding))
        shards = _wire.assemble_chunks(
            _at_most_shards(itertools.chain([first], chunks), len(expected), spec.array_id),
            segments=segments, bulk=bulk)[1]
        if bulk is not None:
            bulk.wait()
        return mesh, info, expected, shards

    def _place_put(self, spec: pb.ArraySpec, mesh, info: pb.SliceInfo, expected: dict,
                   shards: list[_wire.ReceivedShard]) -> int:
        """Copies a put's shards onto this host's devices (before their segments close) and
        stores the array."""
        self._store_placed(spec, mesh, info, self._place_shards(spec, mesh, info, expected,
                                                                shards))
        return sum(s.data.nbytes for s in shards)

    def _place_shards(self, spec: pb.ArraySpec, mesh, info: pb.SliceInfo, expected: dict,
                      shards: list[_wire.ReceivedShard]) -> dict[int, jax.Array]:
        """Copies shards onto this host's devices: mesh position -> its device buffer."""
        flat_devices = mesh.devices.reshape(-1)
        placed: dict[int, jax.Array] = {}
        for shard in shards:
            if expected.get(shard.index) is None:
                raise InvalidArgumentError(f"shard {shard.index} does not belong to the sharding")
            for i, position in enumerate(shard.positions):
                if position not in expected[shard.index]:
                    raise InvalidArgumentError(f"mesh position {position} does not hold {shard.index}")
                if info.devices[position].host != self.host:
                    raise InvalidArgumentError(f"mesh position {position} is on host "
                                               f"{info.devices[position].host}, not this one")
                if position in placed:
                    raise InvalidArgumentError(f"mesh position {position} is sent twice")
                # No two devices share memory (a donated buffer is written in place).
                placed[position] = jax.device_put(_shm.device_copy(shard.data, take=i == 0),
                                                  flat_devices[position])
        jax.block_until_ready(list(placed.values()))
        return placed

    def _store_placed(self, spec: pb.ArraySpec, mesh, info: pb.SliceInfo,
                      placed: dict[int, jax.Array]) -> None:
        """Stores a put's array once its shards are on every device of this host."""
        shape = tuple(spec.shape)
        local = [p for p, d in enumerate(info.devices) if d.host == self.host]
        if len(placed) != len(local):
            raise InvalidArgumentError(f"array {spec.array_id}: got shards for {len(placed)} of "
                                       f"the {len(local)} devices of this host")
        sharding = NamedSharding(mesh, _wire.spec_from_proto(spec.sharding))
        # Only this host's shards: on a slice spanning hosts the array is a global one.
        value = jax.make_array_from_single_device_arrays(shape, sharding,
                                                         [placed[p] for p in local])
        self._settle(spec.array_id, lambda: self.store.set(
            spec.array_id, value, sum(placed[p].nbytes for p in placed),
            ("a put on slice {}", spec.sharding.slice_id)))

    def get(self, request: pb.GetArrayRequest, limit: float = MAX_GET_TIMEOUT_S,
            active: Callable[[], bool] = lambda: True) -> Iterator[pb.ArrayChunk]:
        """Chunks of the requested (or all distinct) shards of an array, waiting for it if pending
        (up to the request's timeout, at most `limit` s: the caller's deadline; no longer once
        `active()` says the caller is gone: a cancelled read does not hold its thread)."""
        timeout = min(_limits.check_seconds(request.timeout_s, "timeout_s", MAX_GET_TIMEOUT_S),
                      max(limit, 0.0))
        call_deadline = time.monotonic() + max(limit, 0.0)
        deadline = time.monotonic() + timeout
        self.wait_received(request.after_sequence, timeout, active)
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                value = self.store.get(request.array_id, min(left, CALLER_CHECK_S))
                break
            except DeadlineExceededError as exc:
                if exc.origin != STORE:
                    raise  # the producer's own failure
                if left <= CALLER_CHECK_S or not active():
                    raise DeadlineExceededError(f"array {request.array_id} was not produced "
                                                f"within {timeout:.1f} s") from None
        if request.ready_only:
            value.block_until_ready()
            return iter(())
        distinct = _wire.distinct_blocks(value)  # not value.addressable_shards: racy
        wanted = [_wire.index_from_proto(i) for i in request.shards] or list(distinct)
        missing = [w for w in wanted if w not in distinct]
        if missing:
            raise NotFoundError(f"array {request.array_id}: shard {missing[0]} is not on this host "
                                f"(it holds {sorted(distinct)} of {value.dtype}{list(value.shape)}"
                                f", stored by {self.store.origin(request.array_id) or '?'}: "
                                f"{describe_layout(value)})")
        if request.process_address:  # the caller's memory on this machine: write straight into it
            return iter(_cma.write_regions(request.process_segment, request.process_address,
                                           value.shape, value.dtype,
                                           [(w, distinct[w]) for w in wanted]))
        if request.shared_array:  # the caller's segment on this machine: copy straight into it
            return iter(_shm.write_regions(request.shared_array, value.shape, value.dtype,
                                           [(w, distinct[w]) for w in wanted]))
        if request.bulk:  # the caller reads the bytes from the bulk channel
            if self.bulk is None:
                raise FailedPreconditionError(f"host {self.island}.{self.host} has no bulk "
                                              f"channel")
            return self.bulk.serve_read(request.array_id, [(w, distinct[w]) for w in wanted],
                                        call_deadline, active)
        # Views of the buffers: the server encodes them without copying (proto.chunk_codec).
        return _wire.iter_chunks(None, ((w, (), np.asarray(distinct[w])) for w in wanted),
                                 views=True)


def _at_most_shards(chunks: Iterator[pb.ArrayChunk], most: int,
                    array_id: int) -> Iterator[pb.ArrayChunk]:
    """`chunks`, refusing a stream with more shard headers than the array has distinct shards
    (zero-size shards cost a sender nothing; each one costs the host a buffer)."""
    headers = 0
    for chunk in chunks:
        if chunk.HasField("shard"):
            headers += 1
            if headers > most:
                raise InvalidArgumentError(f"array {array_id}: more than its {most} distinct "
                                           f"shards in one stream")
        yield chunk
