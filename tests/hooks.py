"""Test hooks on a running host: holding an island's order from inside its executor."""

from __future__ import annotations

import threading

HOOK_S = 120  # the longest a hook holds an island's order (a failing test ends sooner)


class OrderHold:
    """Executions of a program whose name contains `name` block `worker`'s executor (and with it
    the island's order) until `release` is set; `held` is set once one is blocked."""

    def __init__(self, worker, name: str) -> None:
        self.executor, self.name = worker.executor, name
        self.held, self.release = threading.Event(), threading.Event()
        self._real = self.executor._execute

    def __enter__(self) -> OrderHold:
        def execute(sequence, ex, received):
            loaded = self.executor._loaded.get(ex.executable_id)
            if loaded is not None and self.name in loaded.name:
                self.held.set()
                self.release.wait(HOOK_S)
            return self._real(sequence, ex, received)

        self.executor._execute = execute
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        del self.executor._execute
