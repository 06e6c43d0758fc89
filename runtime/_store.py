"""A host's id-keyed table of arrays.

Entries are futures: an array that a queued computation will produce, or that a client is still
streaming in, already has an entry, and readers wait on it with a deadline. That is what lets the
controller hand out output handles before anything runs.
"""

from __future__ import annotations

import threading
import time

import jax

from runtime._errors import ArrayNotFoundError, DeadlineExceededError, PathwaysError


class _Entry:
    __slots__ = ("ready", "value", "error", "nbytes")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.value: jax.Array | None = None
        self.error: PathwaysError | None = None
        self.nbytes = 0


class ArrayStore:
    """Arrays of one host by id; thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._nbytes = 0

    def expect(self, array_id: int) -> None:
        """Creates a pending entry (no-op if the id already has one)."""
        with self._lock:
            self._entries.setdefault(array_id, _Entry())

    def set(self, array_id: int, value: jax.Array) -> None:
        """Fulfils an entry (creating it if needed); readers waiting on it wake up."""
        nbytes = sum(s.data.nbytes for s in value.addressable_shards)
        with self._lock:
            entry = self._entries.setdefault(array_id, _Entry())
            if entry.ready.is_set():
                self._nbytes -= entry.nbytes
            entry.value, entry.error, entry.nbytes = value, None, nbytes
            self._nbytes += nbytes
        entry.ready.set()

    def fail(self, array_id: int, error: PathwaysError) -> None:
        """Marks an entry failed: readers get `error`."""
        with self._lock:
            entry = self._entries.setdefault(array_id, _Entry())
        entry.error = error
        entry.ready.set()

    def get(self, array_id: int, timeout: float) -> jax.Array:
        """The array, waiting up to `timeout` s for it to be produced.

        Raises ArrayNotFoundError (no entry), DeadlineExceededError (still pending at the deadline),
        or the error the array's producer failed with.
        """
        with self._lock:
            entry = self._entries.get(array_id)
        if entry is None:
            raise ArrayNotFoundError(f"array {array_id} is not on this host (never created or deleted)")
        if not entry.ready.wait(timeout):
            raise DeadlineExceededError(f"array {array_id} was not produced within {timeout:.1f} s")
        if entry.error is not None:
            raise entry.error
        assert entry.value is not None
        return entry.value

    def contains(self, array_id: int) -> bool:
        with self._lock:
            return array_id in self._entries

    def delete(self, array_id: int) -> bool:
        """Drops an entry; a reader still waiting on it gets ArrayNotFoundError. True if it existed."""
        with self._lock:
            entry = self._entries.pop(array_id, None)
            if entry is None:
                return False
            if entry.ready.is_set():
                self._nbytes -= entry.nbytes
        if not entry.ready.is_set():
            entry.error = ArrayNotFoundError(f"array {array_id} was deleted before it was produced")
            entry.ready.set()
        return True

    def clear(self) -> None:
        for array_id in list(self._entries):
            self.delete(array_id)

    def stats(self) -> tuple[int, int]:
        """(number of entries, bytes of ready arrays)."""
        with self._lock:
            return len(self._entries), self._nbytes


def wait_all(store: ArrayStore, ids, deadline: float) -> list[jax.Array]:
    """Every array in `ids`, waiting until the absolute `deadline` (time.monotonic())."""
    return [store.get(i, max(0.0, deadline - time.monotonic())) for i in ids]
