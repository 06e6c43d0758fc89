"""Device busy time from the hosts' execution timelines, idle-gap attribution, and a trace file.

Every host timestamps each execution (runtime.Worker: received, picked, start, end). Over a
window, a device is busy while an execution that uses it runs; utilisation = busy / wall. The gap
before an execution is attributed from its timestamps:

    dispatch   the instruction had not reached the host yet           [prev end, received)
    host work  the executor was busy with other instructions          [.., picked)
    inputs     its inputs (a transfer from another island, a put) were still on their way
               [.., start)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence

from proto import pathways_pb2 as pb


@dataclasses.dataclass(frozen=True)
class HostTimeline:
    """The executions one host ran, oldest first."""

    island: int
    host: int
    events: tuple[pb.ExecutionEvent, ...]


@dataclasses.dataclass(frozen=True)
class Busy:
    """Busy time of one host over a window, and where its idle time went."""

    island: int
    host: int
    devices: int
    window_s: float
    busy_s: float
    idle_dispatch_s: float
    idle_host_s: float
    idle_inputs_s: float

    @property
    def utilization(self) -> float:
        return self.busy_s / self.window_s if self.window_s > 0 else 0.0


def clip(a: float, b: float, lo: float, hi: float) -> float:
    """Length of [a, b) inside [lo, hi)."""
    return max(0.0, min(b, hi) - max(a, lo))


def host_busy(timeline: HostTimeline, start: float, end: float) -> Busy:
    """Busy time and idle attribution of one host inside [start, end)."""
    events = sorted(timeline.events, key=lambda e: e.start)
    busy = dispatch = host = inputs = 0.0
    previous_end = start
    devices = max((e.devices for e in events), default=0)
    for e in events:
        busy += clip(e.start, e.end, start, end)
        gap_start = max(previous_end, start)
        if e.start > gap_start:  # attribute the idle gap before this execution
            received = min(max(e.received, gap_start), e.start)
            picked = min(max(e.picked, received), e.start)
            dispatch += clip(gap_start, received, start, end)
            host += clip(received, picked, start, end)
            inputs += clip(picked, e.start, start, end)
        previous_end = max(previous_end, e.end)
    if previous_end < end:  # idle at the end of the window: nothing had been dispatched
        dispatch += clip(previous_end, end, start, end)
    return Busy(timeline.island, timeline.host, devices, end - start, busy, dispatch, host, inputs)


def busy_over_time(timeline: HostTimeline, start: float, end: float, bins: int
                   ) -> list[float]:
    """Busy fraction of one host in `bins` equal slices of [start, end)."""
    width = (end - start) / bins
    out = [0.0] * bins
    for e in timeline.events:
        for i in range(bins):
            lo = start + i * width
            out[i] += clip(e.start, e.end, lo, lo + width) / width
    return [min(1.0, x) for x in out]


def chrome_trace(timelines: Sequence[HostTimeline], dispatches: Iterable[tuple[str, float]],
                 origin: float) -> dict:
    """A Chrome/Perfetto trace (JSON object format): one process per island, one track per device
    of each host running its executions, a track of input waits (transfers) per host, and the
    client's dispatches as instant events."""
    events: list[dict] = []
    for t in timelines:
        pid = t.island
        events.append({"ph": "M", "pid": pid, "name": "process_name",
                       "args": {"name": f"island {t.island}"}})
        devices = max((e.devices for e in t.events), default=1)
        for d in range(devices):
            tid = t.host * 1000 + d
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                           "args": {"name": f"host {t.host} device {d}"}})
            for e in t.events:
                events.append({"ph": "X", "pid": pid, "tid": tid, "name": e.name,
                               "ts": (e.start - origin) * 1e6, "dur": (e.end - e.start) * 1e6,
                               "args": {"sequence": e.sequence}})
        wait_tid = t.host * 1000 + 999
        events.append({"ph": "M", "pid": pid, "tid": wait_tid, "name": "thread_name",
                       "args": {"name": f"host {t.host} waiting for inputs"}})
        for e in t.events:
            waited = e.start - max(e.picked, e.received)
            if waited > 1e-4:
                events.append({"ph": "X", "pid": pid, "tid": wait_tid, "name": "inputs / transfer",
                               "ts": (e.start - waited - origin) * 1e6, "dur": waited * 1e6,
                               "args": {"for": e.name, "sequence": e.sequence}})
    client_pid = 1_000
    events.append({"ph": "M", "pid": client_pid, "name": "process_name",
                   "args": {"name": "client (dispatch)"}})
    for name, when in dispatches:
        events.append({"ph": "i", "pid": client_pid, "tid": 0, "name": name, "s": "t",
                       "ts": (when - origin) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path, trace: dict) -> None:
    with open(path, "w") as f:
        json.dump(trace, f)
