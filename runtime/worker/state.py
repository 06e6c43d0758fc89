"""What a host's executor is doing: one dataclass that the executor writes, and status, the
progress stream and the hang watchdog (runtime.worker.hang) read."""

from __future__ import annotations

import collections
import dataclasses
import time

from proto import pathways_pb2 as pb

#: The executor's activity when it runs nothing.
IDLE = ("idle",)


@dataclasses.dataclass
class ExecutorState:
    """The executor's state. `activity` is (what, name, sequence, session, since, slice id), or
    IDLE; it is replaced whole (never changed in place), so a reader holding one sees a consistent
    tuple, and can tell by identity whether the executor moved on. `instruction` is the one being
    applied; `executed` the last sequence number applied; `hang` the report of a computation that
    ran past its deadline ("" while none has)."""

    activity: tuple = IDLE
    instruction: pb.Instruction | None = None
    executed: int = 0
    hang: str = ""


@dataclasses.dataclass(frozen=True)
class ExecutionRecord:
    """Timestamps of one execution on this host (time.time() seconds), for utilisation accounting:
    received (instruction arrived), picked (executor took it up), start (inputs present, computation
    launched), end (computation done)."""

    sequence: int
    name: str
    received: float
    picked: float
    start: float
    end: float
    devices: int
    session_id: int = 0


def current_state(state: tuple) -> str:
    """The first word of an executor's state ("running", "waiting", "compiling"; "" when idle),
    as HostInfo.current_state carries it to a peer's hang watchdog (runtime.worker.hang)."""
    return state[0].split()[0] if len(state) > 1 else ""


def describe_activity(state: tuple, hang: str) -> str:
    """An executor's state (what, name, sequence, session, since, slice id), or ("idle",), as
    status shows it: e.g. "running step (#12, session 3) for 0.2 s"; "stuck: ..." once hung."""
    if len(state) < 6:
        return state[0]
    what, name, sequence, session, since, _ = state
    where = f"#{sequence}, session {session}" if session else f"#{sequence}"
    text = (f"{what} {name} ({where}) for {time.monotonic() - since:.1f} s" if sequence
            else f"{what} {name} for {time.monotonic() - since:.1f} s")
    return f"stuck: {text}" if hang else text


def entries_after(log: collections.deque, cursor: int) -> list[tuple]:
    """The entries of an append-only log of (increasing number, ...) tuples numbered above
    `cursor`, oldest first. Writers append meanwhile: it walks back from the end by index (each
    read is atomic), skipping entries seen twice as the end moves."""
    fresh: list[tuple] = []
    back = 1
    while back <= len(log):
        try:
            entry = log[-back]
        except IndexError:
            break
        if entry[0] <= cursor:
            break
        if not fresh or entry[0] < fresh[-1][0]:
            fresh.append(entry)
        back += 1
    fresh.reverse()
    return fresh
