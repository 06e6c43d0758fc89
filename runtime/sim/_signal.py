"""A broadcast wake-up for coroutines of one event loop, that nobody can miss."""

from __future__ import annotations

import asyncio


class Signal:
    """Fired when something changes; `version` counts the firings.

    A waiter passes the version it last saw: it returns at once when the signal has fired since,
    so a firing between two waits is never lost (an asyncio.Event cleared after a wake-up loses
    the firings that come before the clear).
    """

    def __init__(self) -> None:
        self.version = 0
        self._event: asyncio.Event | None = None

    def fire(self) -> None:
        self.version += 1
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, seen: int, timeout: float) -> int:
        """Waits until the signal fires after version `seen`, or `timeout` s; returns the version."""
        if self.version == seen and timeout > 0:
            if self._event is None:
                self._event = asyncio.Event()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.version
