"""A host's id-keyed table of arrays.

Entries are futures: an array that a queued computation will produce, or that a client is still
streaming in, already has an entry, and readers wait on it with a deadline. That is what lets the
controller hand out output handles before anything runs.
"""

from __future__ import annotations

import math
import threading
import time

import jax
from jax.sharding import NamedSharding

from proto import wire as _wire
from proto.errors import (STORE, ArrayNotFoundError, DeadlineExceededError, InvalidArgumentError,
                          PathwaysError)


class _Entry:
    __slots__ = ("ready", "value", "error", "nbytes", "origin")

    def __init__(self) -> None:
        self.ready = False
        self.value: jax.Array | None = None
        self.error: PathwaysError | None = None
        self.nbytes = 0
        self.origin: tuple = ()  # what stored the value: a format string and its arguments


class ArrayStore:
    """Arrays of one host by id; thread-safe.

    One condition variable serves every entry (a per-entry Event costs more to create than most
    entries are ever waited on): writers notify only when some reader is waiting.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._cond = threading.Condition()
        self._waiters = 0
        self._nbytes = 0

    def expect(self, array_id: int) -> None:
        """Creates a pending entry (no-op if the id already has one)."""
        with self._cond:
            if array_id not in self._entries:
                self._entries[array_id] = _Entry()

    def _settle(self, entry: _Entry) -> None:
        entry.ready = True
        if self._waiters:
            self._cond.notify_all()

    def set(self, array_id: int, value: jax.Array, nbytes: int | None = None,
            origin: tuple = ()) -> None:
        """Fulfils an entry (creating it if needed); readers waiting on it wake up.

        `nbytes` is what the array occupies on this host's devices; computed from its shards when
        not given (slower: the executor passes figures it knows from the output specs).
        `origin` says what stored it: a format string and its arguments (formatted only when an
        error names it: `origin`).
        """
        if nbytes is None:
            nbytes = local_nbytes(value)
        with self._cond:
            entry = self._entries.get(array_id)
            if entry is None:
                entry = self._entries[array_id] = _Entry()
            elif entry.ready:
                self._nbytes -= entry.nbytes
            entry.value, entry.error, entry.nbytes = value, None, nbytes
            entry.origin = origin
            self._nbytes += nbytes
            self._settle(entry)

    def fail(self, array_id: int, error: PathwaysError, *, only_pending: bool = False) -> None:
        """Marks an entry failed: readers get `error`. With `only_pending`, an entry that already
        holds its array keeps it."""
        with self._cond:
            entry = self._entries.setdefault(array_id, _Entry())
            if only_pending and entry.ready and entry.error is None:
                return
            if entry.ready:
                self._nbytes -= entry.nbytes
            entry.value, entry.error, entry.nbytes, entry.origin = None, error, 0, ()
            self._settle(entry)

    def get(self, array_id: int, timeout: float) -> jax.Array:
        """The array, waiting up to `timeout` s for it to be produced.

        Raises ArrayNotFoundError (no entry, or deleted while waited on), DeadlineExceededError
        (still pending at the deadline), or the error the array's producer failed with;
        InvalidArgumentError for a timeout that is not a finite number >= 0 (a NaN would make the
        wait below return at once, forever).
        """
        if not math.isfinite(timeout) or timeout < 0:
            raise InvalidArgumentError(f"a wait for array {array_id} needs a finite timeout >= 0, "
                                       f"got {timeout}")
        with self._cond:
            entry = self._entries.get(array_id)
            if entry is None:
                raise ArrayNotFoundError(f"array {array_id} is not on this host (never "
                                         f"created or deleted)", origin=STORE)
            if not entry.ready:
                deadline = time.monotonic() + timeout
                self._waiters += 1
                try:
                    while not entry.ready:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise DeadlineExceededError(f"array {array_id} was not produced "
                                                        f"within {timeout:.1f} s", origin=STORE)
                        self._cond.wait(left)
                finally:
                    self._waiters -= 1
        if entry.error is not None:
            raise entry.error
        return entry.value

    def origin(self, array_id: int) -> str:
        """What stored the array ("" when unknown or not stored)."""
        with self._cond:
            entry = self._entries.get(array_id)
            if entry is None or not entry.origin:
                return ""
            return entry.origin[0].format(*entry.origin[1:])

    def contains(self, array_id: int) -> bool:
        with self._cond:
            return array_id in self._entries

    def ready(self, array_id: int) -> bool:
        """Whether the id has an entry that holds its array or its failure."""
        with self._cond:
            entry = self._entries.get(array_id)
            return entry is not None and entry.ready

    def delete(self, array_id: int) -> bool:
        """Drops an entry; a reader still waiting on it gets ArrayNotFoundError. True if it existed."""
        with self._cond:
            entry = self._entries.pop(array_id, None)
            if entry is None:
                return False
            if entry.ready:
                self._nbytes -= entry.nbytes
            else:
                entry.error = ArrayNotFoundError(f"array {array_id} was deleted before it was "
                                                 f"produced")
                self._settle(entry)
            return True

    def clear(self) -> None:
        """Drops every entry; readers still waiting get ArrayNotFoundError at once."""
        for array_id in list(self._entries):
            self.delete(array_id)

    def stats(self) -> tuple[int, int]:
        """(number of entries, bytes of ready arrays)."""
        with self._cond:
            return len(self._entries), self._nbytes


def local_nbytes(value: jax.Array) -> int:
    """Bytes an array occupies on this process's devices (replicas counted)."""
    return sum(data.nbytes for _, _, data in _wire.addressable_blocks(value))


def describe_layout(value: jax.Array) -> str:
    """How an array lies on this host's devices: its sharding (a NamedSharding's spec, mesh shape
    and mesh devices by id) and each addressable shard's device and block. For errors about a
    shard the array lacks: it says whether the sharding or the buffers disagree with the caller."""
    sharding = value.sharding
    if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh
        where = (f"{sharding.spec} over mesh {dict(mesh.shape)} of devices "
                 f"{[d.id for d in mesh.devices.flat]}")
    else:
        where = str(sharding)
    blocks = [f"{device.id}: {block}" for block, device, _ in _wire.addressable_blocks(value)]
    return f"{where}; shards by device {{{', '.join(blocks)}}}"


def wait_all(store: ArrayStore, ids, deadline: float) -> list[jax.Array]:
    """Every array in `ids`, waiting until the absolute `deadline` (time.monotonic())."""
    return [store.get(i, max(0.0, deadline - time.monotonic())) for i in ids]
