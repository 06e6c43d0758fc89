"""Puts that arrive in several streams at once: a sender splits a host's shards of an array over
`parts` streams (ArrayChunk.parts on the first message of each), so a sharded array's bytes use
several connections and threads at once, as fetches do with one stream per shard.

The first stream of a put to arrive claims the array (the announcement, as a single-stream put
does: runtime.worker.dataplane); the others of the same put (ArrayChunk.put) join that claim. A
put that follows another of the same array (made again after it failed, while its streams are
still finishing here) claims the array once the earlier one has let it go. Each stream copies its
shards onto their devices, then waits for the rest; the stream that brings the last shards stores
the array. Every stream answers with the outcome of the whole put: all succeed, or all fail with
the first error (a bad shard, a shard sent twice, a stream missing past the deadline), and the
array stays announced and empty, so a new put of it may follow. Nothing outlives the streams.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax

from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto.errors import DeadlineExceededError, InvalidArgumentError
from runtime.worker.announced import check_as_announced
from runtime.worker.defaults import ANNOUNCE_TIMEOUT_S

if TYPE_CHECKING:
    from runtime.worker.dataplane import DataPlane


class _Put:
    """One array being put in parts: the claim, the shards placed so far, the outcome."""

    def __init__(self, parts: int, earlier: list[_Put]) -> None:
        self.parts = parts
        self.earlier = earlier  # puts of the same array still here: it claims once they let go
        self.released = threading.Event()  # this put has let the array go (stored or not)
        self.streams = 0  # streams that joined
        self.arrived = 0  # streams whose shards are placed
        self.spec: pb.ArraySpec | None = None
        self.placed: dict[int, jax.Array] = {}
        self.error: Exception | None = None
        self.done = False
        self.claimed = threading.Event()
        self.cond = threading.Condition()

    def decided(self) -> bool:
        """Whether the put has failed or stored the array (no stream may join it any more)."""
        with self.cond:
            return self.done or self.error is not None

    def fail(self, error: Exception) -> None:
        with self.cond:
            if self.error is None and not self.done:
                self.error = error
            self.cond.notify_all()


class PutParts:
    """The puts in parts of one host's data plane (see the module docstring)."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._lock = threading.Lock()
        self._puts: dict[tuple[int, int], _Put] = {}  # (array id, ArrayChunk.put) -> the put
        self._live: dict[int, list[_Put]] = {}  # array id -> its puts here, until each ends

    def put(self, first: pb.ArrayChunk, chunks: Iterator[pb.ArrayChunk], timeout: float) -> int:
        """One stream of a put in `first.parts` parts; returns the bytes it carried once the
        whole array is stored (waiting up to `timeout` s for the other streams)."""
        deadline = time.monotonic() + timeout
        array_id = first.spec.array_id
        key = (array_id, first.put)
        with self._lock:
            record = self._puts.get(key)
            # A sender that names no put (0): a decided put's streams may still be finishing,
            # and a stream arriving then starts a new put rather than join it.
            owner = record is None or (not first.put and record.decided())
            if owner:
                live = self._live.setdefault(array_id, [])
                record = self._puts[key] = _Put(first.parts, list(live))
                live.append(record)
            record.streams += 1
        try:
            return self._receive(record, owner, first, chunks, timeout, deadline)
        except Exception as exc:
            record.fail(exc)
            raise
        finally:
            if owner:
                self._finish(key, record, deadline)

    def _receive(self, record: _Put, owner: bool, first: pb.ArrayChunk,
                 chunks: Iterator[pb.ArrayChunk], timeout: float, deadline: float) -> int:
        plane = self._plane
        if first.parts != record.parts or record.streams > record.parts:
            raise InvalidArgumentError(f"array {first.spec.array_id}: streams disagree on how "
                                       f"many parts its put has")
        if owner:
            try:
                for earlier in record.earlier:
                    if not earlier.released.wait(max(0.0, deadline - time.monotonic())):
                        raise DeadlineExceededError(f"array {first.spec.array_id}: an earlier "
                                                    f"put of it did not let it go in time")
                record.spec = plane._claim(first.spec.array_id, min(timeout, ANNOUNCE_TIMEOUT_S))
            finally:
                record.claimed.set()
        elif not record.claimed.wait(max(0.0, deadline - time.monotonic())):
            raise DeadlineExceededError(f"array {first.spec.array_id}: no claim of its put")
        if record.spec is None:
            raise record.error or InvalidArgumentError("the put's first stream failed")
        spec = record.spec
        check_as_announced(first.spec, spec)
        with _shm.OpenSegments() as segments:
            mesh, info, expected, shards = plane._receive_shards(spec, first, chunks, timeout,
                                                                  segments)
            local = sum(d.host == plane.host for d in info.devices)
            if record.parts > local:
                raise InvalidArgumentError(f"array {spec.array_id}: {record.parts} parts for "
                                           f"{local} devices")
            placed = plane._place_shards(spec, mesh, info, expected, shards)
        with record.cond:
            if record.error is not None:
                raise record.error
            twice = set(placed) & set(record.placed)
            if twice:
                raise InvalidArgumentError(f"mesh position {min(twice)} is sent twice")
            record.placed.update(placed)
            record.arrived += 1
            if record.arrived == record.parts:
                plane._store_placed(spec, mesh, info, record.placed)
                record.done = True
                record.cond.notify_all()
            while not record.done and record.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(
                        f"array {spec.array_id}: {record.arrived} of the {record.parts} streams "
                        f"of its put arrived in time")
                record.cond.wait(left)
            if record.error is not None:
                raise record.error
        return sum(s.data.nbytes for s in shards)

    def _finish(self, key: tuple[int, int], record: _Put, deadline: float) -> None:
        """The claiming stream, last: once the put is decided (or the deadline passed, failing
        it), the array may be claimed again (if it was not stored)."""
        array_id = key[0]
        with record.cond:
            while not record.done and record.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    record.error = DeadlineExceededError(f"array {array_id}: streams of its put "
                                                         f"missing")
                    record.cond.notify_all()
                    break
                record.cond.wait(left)
        # Let go of the array before forgetting the put: a put arriving in between finds it
        # (and sees it has let go), never an array still claimed by a put it cannot find.
        try:
            if record.spec is not None:
                self._plane._release(array_id)
        finally:
            record.released.set()
            record.earlier = []  # no chain of decided puts kept alive
            with self._lock:
                if self._puts.get(key) is record:
                    del self._puts[key]
                live = self._live.get(array_id, [])
                if record in live:
                    live.remove(record)
                if not live:
                    self._live.pop(array_id, None)

