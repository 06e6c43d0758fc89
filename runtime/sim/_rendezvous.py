"""Where the simulated hosts of a slice meet: a computation on several hosts starts on all at once.

On real devices a computation on a slice spanning hosts runs its collectives across them, so it
completes only when every host of the slice launches it; a host that is elsewhere leaves the
others waiting for ever. Simulated hosts keep that rule: each host arriving at a multi-host
computation registers at a meeting point named by the island's order (controller incarnation,
epoch, sequence number) and the computation (executable id), and the computation starts when the
last host of the slice has arrived, on every host at the same simulated time. Hosts that reach the
same place of the order with different computations (an order broken from outside) meet nobody:
they wait until their hang is reported (runtime.sim._host).

The hosts of an island live in one process (runtime.sim._process), so a meeting is a future on
their shared event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Hashable


@dataclasses.dataclass
class _Meeting:
    hosts: frozenset[int]
    ready: dict[int, float]  # host -> when its devices could start (simulated time.time())
    started: asyncio.Future  # the common start time, once every host has arrived


class Rendezvous:
    """The meeting points of one island's hosts; used on their event loop only."""

    def __init__(self) -> None:
        self._meetings: dict[Hashable, _Meeting] = {}

    def arrive(self, place: Hashable, host: int, ready: float, hosts: frozenset[int]
               ) -> asyncio.Future:
        """Registers `host` at `place`, able to start at `ready`; `hosts` are the slice's hosts.
        Returns a future of the start time (the latest `ready` of them all), set when the last
        host arrives. Awaiting it with a timeout must not cancel it (use asyncio.wait)."""
        meeting = self._meetings.get(place)
        if meeting is None:  # the same place names the same computation, so the same hosts
            meeting = self._meetings[place] = _Meeting(
                hosts, {}, asyncio.get_running_loop().create_future())
        meeting.ready[host] = ready
        if len(meeting.ready) >= len(meeting.hosts):  # every arrival is one of them
            del self._meetings[place]
            if not meeting.started.done():
                meeting.started.set_result(max(meeting.ready.values()))
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
