"""Source buffers held by a host's sends until they are streamed.

A send takes its source at its place in the island's order and streams it later, on a transfer
thread. Until then the send holds the source's `jax.Array`, so a later delete (which only drops the
store's reference) cannot free the buffers. Donation would still destroy them: a computation that
donates an input frees (or overwrites) its buffers whatever references remain. So a computation
ordered after the send donates a fresh copy instead (`SendPins.spare_donated`), and what the send
streams is exactly what the array held at the send's place in the order.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import jax


class SendPins:
    """Arrays captured by sends not yet streamed, by identity; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[jax.Array, int]] = {}  # id(array) -> (array, sends holding it)

    def pin(self, value: jax.Array) -> None:
        """A send holds `value` until the matching `unpin`."""
        with self._lock:
            _, count = self._held.get(id(value), (value, 0))
            self._held[id(value)] = (value, count + 1)

    def unpin(self, value: jax.Array) -> None:
        """One send holding `value` is done with it."""
        with self._lock:
            held = self._held.get(id(value))
            if held is None:
                return
            if held[1] <= 1:
                del self._held[id(value)]
            else:
                self._held[id(value)] = (value, held[1] - 1)

    def holds(self, value: object) -> bool:
        with self._lock:
            return id(value) in self._held and self._held[id(value)][0] is value

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def spare_donated(self, inputs: list, donated: Sequence[int]) -> None:
        """Replaces each donated input that a send still holds by a copy on the same devices, so
        the computation donates the copy and the send's buffers stay as they were. The copy is
        enqueued behind the input's producer, before the donating computation: it reads the
        buffers before anything can overwrite them."""
        for position in donated:
            value = inputs[position]
            if self.holds(value):
                inputs[position] = jax.device_put(value, value.sharding, may_alias=False)
