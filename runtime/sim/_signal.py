"""A broadcast wake-up for coroutines of one event loop, that nobody can miss."""

from __future__ import annotations

import asyncio


class Signal:
    """Fired when something changes; `version` counts the firings.

    A waiter passes the version it last saw: it returns at once when the signal has fired since,
    so a firing between two waits is never lost (an asyncio.Event cleared after a wake-up loses
    the firings that come before the clear). A wait is a bare future and a timer on the loop (no
    task per wait, as asyncio.wait_for makes): many simulated hosts wait on one loop.
    """

    def __init__(self) -> None:
        self.version = 0
        self._waiters: list[asyncio.Future] = []

    def fire(self) -> None:
        self.version += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            settle(waiter)

    async def wait(self, seen: int, timeout: float) -> int:
        """Waits until the signal fires after version `seen`, or `timeout` s; returns the version."""
        if self.version == seen and timeout > 0:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(timeout, settle, waiter)
            try:
                await waiter  # a cancelled wait cancels `waiter` with it
            finally:
                timer.cancel()
                if self.version == seen:  # timed out or cancelled: not taken by a firing
                    self._waiters.remove(waiter)
        return self.version


def settle(future: asyncio.Future, value: object = None) -> None:
    """Sets `future`'s result unless it is done already (woken, timed out or cancelled)."""
    if not future.done():
        future.set_result(value)


async def wait_done(future: asyncio.Future, timeout: float | None) -> None:
    """Waits until `future` is done or `timeout` s have passed (None: no limit), without
    cancelling it (others may await it too); cheaper than asyncio.wait on one future."""
    if future.done():
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: asyncio.Future) -> None:
        settle(waiter)

    future.add_done_callback(wake)
    timer = None if timeout is None else loop.call_later(timeout, settle, waiter)
    try:
        await waiter
    finally:
        future.remove_done_callback(wake)
        if timer is not None:
            timer.cancel()
