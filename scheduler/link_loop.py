"""One event loop for every host link of a process: the controller's delivery to its hosts, their
progress streams and pings run as coroutines of a single thread (grpc.aio), however many hosts
there are, instead of threads per host.

Code on the loop must not block for long (it holds up every link); code off the loop hands work to
it with `call` (no wait) or `submit` (a concurrent.futures.Future to wait on, with a deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any

_shared: LinkLoop | None = None
_shared_lock = threading.Lock()


class LinkLoop:
    """An asyncio event loop on a daemon thread of its own."""

    def __init__(self, name: str = "host-links") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    @classmethod
    def shared(cls) -> LinkLoop:
        """The process's loop for host links, started at first use (and never stopped: links
        end their own coroutines when closed)."""
        global _shared
        with _shared_lock:
            if _shared is None or not _shared._thread.is_alive():
                _shared = cls()
            return _shared

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Runs `fn(*args)` on the loop soon; returns at once (from any thread)."""
        if self.on_loop():
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Runs `fn(*args)` on the loop `delay` seconds from now; returns at once (from any
        thread)."""
        self.call(self.loop.call_later, delay, fn, *args)

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        """Runs a coroutine on the loop; its future, to wait on from another thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)
