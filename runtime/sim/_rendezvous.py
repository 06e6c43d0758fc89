"""Where the simulated hosts of a slice meet: a computation on several hosts starts on all at once.

On real devices a computation on a slice spanning hosts runs its collectives across them, so it
completes only when every host of the slice launches it; a host that is elsewhere leaves the
others waiting for ever. Simulated hosts keep that rule: each host arriving at a multi-host
computation registers at a meeting point named by the island's order (controller incarnation,
epoch, sequence number) and the computation (executable id), and the computation starts when the
last host of the slice has arrived, on every host at the same simulated time; the meeting ends,
waking every host of it at once, when the computation does (one timer per computation, not one
per host). Hosts that reach the same place of the order with different computations (an order
broken from outside) meet nobody: they wait until their hang is reported (runtime.sim._host).

The hosts of an island live in one process (runtime.sim._process), so a meeting is a future on
their shared event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Hashable

from runtime.sim._signal import settle


@dataclasses.dataclass
class _Meeting:
    hosts: frozenset[int]
    ready: dict[int, float]  # host -> when its devices could start (simulated time.time())
    seconds: float  # the computation's duration
    started: asyncio.Future  # the common start time, set when the computation ends


class Rendezvous:
    """The meeting points of one island's hosts; used on their event loop only."""

    def __init__(self) -> None:
        self._meetings: dict[Hashable, _Meeting] = {}

    def arrive(self, place: Hashable, host: int, ready: float, hosts: frozenset[int],
               seconds: float = 0.0) -> asyncio.Future:
        """Registers `host` at `place`, able to start at `ready` (simulated time.time()); `hosts`
        are the slice's hosts, `seconds` the computation's duration. Returns a future of the start
        time (the latest `ready` of them all), set once the last host has arrived and the
        computation has run its `seconds` from then. Awaiting it with a timeout must not cancel
        it (other hosts await it too)."""
        meeting = self._meetings.get(place)
        if meeting is None:  # the same place names the same computation, so the same hosts
            meeting = self._meetings[place] = _Meeting(
                hosts, {}, seconds, asyncio.get_running_loop().create_future())
        meeting.ready[host] = ready
        if len(meeting.ready) >= len(meeting.hosts):  # every arrival is one of them
            del self._meetings[place]
            start = max(meeting.ready.values())
            delay = start + meeting.seconds - time.time()
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, settle, meeting.started, start)
            else:
                settle(meeting.started, start)
        return meeting.started

    def arrived(self, place: Hashable) -> list[int]:
        """Hosts waiting at `place` now."""
        meeting = self._meetings.get(place)
        return sorted(meeting.ready) if meeting is not None else []

    def leave(self, host: int) -> None:
        """Withdraws `host` from every meeting (it was reset or stopped)."""
        for place, meeting in list(self._meetings.items()):
            meeting.ready.pop(host, None)
            if not meeting.ready:
                del self._meetings[place]
