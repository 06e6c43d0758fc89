"""Arrays on simulated devices: shapes, and data only when small.

A simulated host keeps, per array, its shape, dtype and the distinct shards its devices hold. An
array put from a client (or copied from another host) keeps its bytes when the shards bound for
the host come to at most `SimConfig.data_limit_bytes`; a larger one keeps only its shape (its bytes
are read off the stream and dropped). A computed array never has data: nothing is computed.
Reading an array without data returns zeros of its shape and dtype, streamed like real data.

Between simulated hosts a shard without data travels as a header with `nbytes` 0 and no chunks.

The store's entries are futures, as on a real host (runtime.worker.store): an array a queued
computation will produce already has an entry, and reads wait on it with a deadline. Everything
here runs on the hosts' event loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import numpy as np

from proto import cma as _cma
from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto import wire as _wire
from proto.errors import (STORE, ArrayNotFoundError, DeadlineExceededError, InvalidArgumentError,
                          PathwaysError)
from runtime.sim._signal import wait_done


@dataclasses.dataclass
class SimArray:
    """One array on one host: its distinct local shards (None: shape only), when it exists on the
    devices (time.time(); for a computed array, the simulated end of its computation), and the
    bytes it occupies on the host's devices (replicas counted)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    shards: dict[_wire.Index, np.ndarray | None]
    ready_at: float
    nbytes: int

    @property
    def has_data(self) -> bool:
        return bool(self.shards) and all(data is not None for data in self.shards.values())

    def chunks(self, wanted: Sequence[_wire.Index]) -> Iterator[pb.ArrayChunk]:
        """Chunk messages of the `wanted` shards: their data, or zeros."""
        for index in wanted:
            data = self.shards[index]
            if data is not None:
                yield from _wire.iter_chunks(None, [(index, (), data)])
            else:
                yield from zero_chunks(index, self.dtype)


def zero_chunks(index: _wire.Index, dtype: np.dtype) -> Iterator[pb.ArrayChunk]:
    """A shard of zeros as chunk messages, made a chunk at a time (never the whole shard)."""
    nbytes = math.prod(_wire.shard_shape(index)) * dtype.itemsize
    header = pb.ShardHeader(index=_wire.index_to_proto(index), nbytes=nbytes)
    zeros = bytes(min(nbytes, _wire.CHUNK_BYTES))
    sent = 0
    while True:
        piece = min(_wire.CHUNK_BYTES, nbytes - sent)
        yield pb.ArrayChunk(shard=header if sent == 0 else None,
                            data=zeros if piece == len(zeros) else zeros[:piece])
        sent += piece
        if sent >= nbytes:
            return


def dataless_chunks(spec: pb.ArraySpec, shards: Sequence[tuple[_wire.Index, Sequence[int]]]
                    ) -> list[pb.ArrayChunk]:
    """The stream that copies shards without data to another simulated host."""
    messages = [pb.ArrayChunk(shard=pb.ShardHeader(index=_wire.index_to_proto(index), nbytes=0,
                                                   mesh_positions=positions))
                for index, positions in shards]
    if messages:
        messages[0].spec.CopyFrom(spec)
    return messages or [pb.ArrayChunk(spec=spec)]


@dataclasses.dataclass
class ReceivedShards:
    """An array stream read by `receive_shards`."""

    spec: pb.ArraySpec
    shards: list[tuple[_wire.Index, list[int], np.ndarray | None]]
    nbytes: int  # bytes the stream carried


async def receive_shards(first: pb.ArrayChunk, rest: AsyncIterator[pb.ArrayChunk],
                         keep_bytes: int) -> ReceivedShards:
    """Reads an array stream (spec, then per shard a header and its data), checking sizes as a
    real host does; keeps the data only while the stream's shards add up to at most `keep_bytes`
    (decided from the headers as they come: a stream that passes the bound drops what it kept)."""
    if not first.HasField("spec"):
        raise InvalidArgumentError("array stream does not start with its spec")
    spec = first.spec
    dtype = _wire.dtype_from_name(spec.dtype)
    shape = _wire.check_shape(spec.shape)
    shards: list[tuple[_wire.Index, list[int], np.ndarray | None]] = []
    declared = carried = 0
    expected = received = 0  # of the current shard
    buffer: bytearray | None = None

    def finish_shard() -> None:
        if received != expected:
            raise InvalidArgumentError(f"shard truncated: {received} of {expected} bytes")
        if buffer is not None and shards:
            index, positions, _ = shards[-1]
            shards[-1] = (index, positions,
                          np.frombuffer(bytes(buffer), dtype).reshape(_wire.shard_shape(index)))

    async def chunks() -> AsyncIterator[pb.ArrayChunk]:
        yield first
        async for chunk in rest:
            yield chunk

    async for chunk in chunks():
        if chunk.HasField("shard"):
            finish_shard()
            index = _wire.index_from_proto(chunk.shard.index)
            if len(index) != len(shape) or not all(0 <= a <= b <= d
                                                   for (a, b), d in zip(index, shape)):
                raise InvalidArgumentError(f"shard {index} lies outside the array's shape {shape}")
            full = math.prod(_wire.shard_shape(index)) * dtype.itemsize
            if chunk.shard.nbytes not in (0, full):
                raise InvalidArgumentError(f"shard header says {chunk.shard.nbytes} bytes, shape "
                                           f"{_wire.shard_shape(index)} of {dtype} is {full}")
            declared += full
            if declared > keep_bytes:  # too big to keep: shapes only, from now on
                shards = [(i, p, None) for i, p, _ in shards]
            expected, received = chunk.shard.nbytes, 0
            buffer = bytearray() if declared <= keep_bytes and expected == full else None
            shards.append((index, list(chunk.shard.mesh_positions), None))
            if chunk.shard.shared_file:
                raise InvalidArgumentError("shard files (ShardHeader.shared_file) are not "
                                           "accepted: shared memory travels as segments")
            if chunk.shard.process_address:  # in the sender's memory (proto.cma)
                if buffer is not None:
                    data = np.empty(_wire.shard_shape(index), dtype)
                    _cma.read(chunk.shard.process_segment, chunk.shard.process_address, data)
                    buffer += data.tobytes()
                received = expected
            if chunk.shard.shared_array:  # its region of a sender's segment (proto.shm)
                if buffer is not None:
                    with _shm.OpenSegments() as segments:
                        whole = segments.array(chunk.shard.shared_array, dtype, shape)
                        buffer += whole[(*_wire.as_slices(index), ...)].tobytes()
                        del whole
                received = expected
        elif not shards:
            if chunk.data:
                raise InvalidArgumentError("array data arrived before any shard header")
            continue
        received += len(chunk.data)
        carried += len(chunk.data)
        if received > expected:
            raise InvalidArgumentError("shard has more bytes than its header says")
        if buffer is not None:
            buffer += chunk.data
    finish_shard()
    return ReceivedShards(spec, shards, carried)


class _Entry:
    __slots__ = ("ready", "value", "error", "waiter")

    def __init__(self) -> None:
        self.ready = False
        self.value: SimArray | None = None
        self.error: PathwaysError | None = None
        self.waiter: asyncio.Future | None = None  # made only when someone waits


class SimStore:
    """One host's arrays by id; entries are futures (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._nbytes = 0

    def expect(self, array_id: int) -> None:
        """Creates a pending entry (no-op if the id has one)."""
        self._entries.setdefault(array_id, _Entry())

    def _settle(self, entry: _Entry) -> None:
        entry.ready = True
        if entry.waiter is not None and not entry.waiter.done():
            entry.waiter.set_result(None)

    def set(self, array_id: int, value: SimArray) -> None:
        """Fulfils an entry (creating it if needed); its readers wake up."""
        entry = self._entries.setdefault(array_id, _Entry())
        if entry.ready:
            self._nbytes -= entry.value.nbytes if entry.value is not None else 0
        entry.value, entry.error = value, None
        self._nbytes += value.nbytes
        self._settle(entry)

    def fail(self, array_id: int, error: PathwaysError, *, only_pending: bool = False) -> None:
        """Readers of the entry get `error` (with `only_pending`, a stored array is kept)."""
        entry = self._entries.setdefault(array_id, _Entry())
        if only_pending and entry.ready and entry.error is None:
            return
        if entry.ready and entry.value is not None:
            self._nbytes -= entry.value.nbytes
        entry.value, entry.error = None, error
        self._settle(entry)

    async def get(self, array_id: int, timeout: float) -> SimArray:
        """The array, waiting up to `timeout` s for it: ArrayNotFoundError, DeadlineExceededError
        or the error its producer failed with otherwise."""
        entry = self._entries.get(array_id)
        if entry is None:
            raise ArrayNotFoundError(f"array {array_id} is not on this host (never created "
                                     f"or deleted)", origin=STORE)
        if not entry.ready:
            if entry.waiter is None:
                entry.waiter = asyncio.get_running_loop().create_future()
            await wait_done(entry.waiter, max(0.0, timeout))
            if not entry.waiter.done():
                raise DeadlineExceededError(f"array {array_id} was not produced within "
                                            f"{timeout:.1f} s", origin=STORE)
        if entry.error is not None:
            raise entry.error
        return entry.value

    async def get_all(self, ids: Sequence[int], deadline: float) -> list[SimArray]:
        """Every array in `ids`, waiting until `deadline` (time.monotonic())."""
        return [await self.get(i, deadline - time.monotonic()) for i in ids]

    def peek(self, array_id: int) -> SimArray | None:
        """The array if it is stored now (no wait), else None."""
        entry = self._entries.get(array_id)
        return entry.value if entry is not None and entry.ready else None

    def contains(self, array_id: int) -> bool:
        return array_id in self._entries

    def ready(self, array_id: int) -> bool:
        """Whether the array holds its data or its failure now."""
        entry = self._entries.get(array_id)
        return entry is not None and entry.ready

    def delete(self, array_id: int) -> bool:
        """Drops an entry; a reader waiting on it gets ArrayNotFoundError. True if it existed."""
        entry = self._entries.pop(array_id, None)
        if entry is None:
            return False
        if entry.ready:
            self._nbytes -= entry.value.nbytes if entry.value is not None else 0
        else:
            entry.error = ArrayNotFoundError(f"array {array_id} was deleted before it was "
                                             f"produced")
            self._settle(entry)
        return True

    def clear(self) -> None:
        """Drops every entry; waiting readers get ArrayNotFoundError at once."""
        for array_id in list(self._entries):
            self.delete(array_id)

    def stats(self) -> tuple[int, int]:
        """(number of entries, bytes of stored arrays on the devices)."""
        return len(self._entries), self._nbytes
