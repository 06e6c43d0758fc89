"""A mapping that remembers only its latest entries: what a process keeps about things it may be
asked about later (an array that failed before it was announced, why a slice was dropped, an
execution's estimate until a host measures it), bounded so that a long run or a hostile client
cannot grow it without end."""

from __future__ import annotations

import collections
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Latest(collections.OrderedDict[K, V]):
    """A dict of at most `limit` entries: adding one past the limit forgets the oldest added
    (replacing a key's value keeps its place). Not thread-safe: its owner's lock guards it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)
