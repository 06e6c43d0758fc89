"""Figures of one point of `pathways bench scale`, from the simulated hosts' timelines, the
client's submissions and the controller process's own accounting.

- Device busy: per host, the simulated device time inside the point's window (first submission to
  last computation's end) over the window, averaged over every host.
- Steady busy: the same, per island from the moment every host of it has started its first
  computation to the island's last end: the devices' use once the order flows, without the
  first trip of the order to the island's hosts (the start-up, `startup_ms`: the latest island's)
  or the wait of islands that finished early for the last one. A short point (--point-s) at many
  hosts spends a visible part of its window on those two.
- Computations/s: computations completed in the window over the window, all islands together.
- Controller CPU per computation: the controller process's user + system CPU seconds (from
  /proc, so it must run in a process of its own) over the point, per computation.
- Latency per stage, per command (a call, or a program run): client submit -> ordered (the
  controller's answer reaches the client) -> the last host of the island received the command's
  first execution -> that execution started. Percentiles of the time from submit to each stage,
  and of each stage's own length (ordered -> last received may be negative: hosts can get the
  instruction before the client gets the answer). Measured twice: by a probe (one command per
  island at a time: dispatch latency itself) and under the point's load (which adds the wait for
  a place in the island's order and for the devices: queueing).
"""

from __future__ import annotations

import bisect
import os
import statistics
from collections.abc import Iterable, Sequence
from concurrent import futures

import numpy as np

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc

#: Percentiles reported for each latency.
PERCENTILES = (50, 99)
#: Parallel timeline reads.
TIMELINE_THREADS = 32


def process_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user + system), resident memory, its peak, and threads of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    stats = {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                stats["rss_bytes" if key == "VmRSS" else "peak_rss_bytes"] = int(
                    value.split()[0]) * 1024
            elif key == "Threads":
                stats["threads"] = int(value)
    return stats


def parse_cpus(text: str) -> set[int]:
    """CPUs given as "0", "0,1" or "0-3,6" (for --controller-cpus)."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or range (e.g. 0 or 0-3)") from None
        if low < 0 or high < low:
            raise ValueError(f"{part!r} is not a CPU range (e.g. 0-3)")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError("no CPU given")
    return cpus


def split_cpus(controller: set[int]) -> tuple[set[int], set[int]]:
    """(the controller's CPUs, the others') out of the CPUs this process may use: the controller
    gets `controller`, the simulated hosts and the benchmark itself the rest."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("this platform cannot pin processes to CPUs")
    usable = os.sched_getaffinity(0)
    if not controller <= usable:
        raise ValueError(f"CPUs {sorted(controller - usable)} are not among this process's "
                         f"CPUs {sorted(usable)}")
    rest = usable - controller
    if not rest:
        raise ValueError(f"CPUs {sorted(controller)} leave no CPU of {sorted(usable)} for the "
                         f"simulated hosts")
    return controller, rest


def pin_process(pid: int, cpus: set[int]) -> int:
    """Pins every thread of process `pid` to `cpus` (threads it starts later inherit it from
    the thread that starts them); returns how many threads were pinned."""
    pinned = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            pinned += 1
        except (ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
            pass
    return pinned


def read_timelines(addresses: dict[int, Sequence[str]], credentials: _auth.Credentials,
                   since: float, timeout: float = 60.0) -> dict[int, list[list[pb.ExecutionEvent]]]:
    """Per island, per host (by index): the executions that ended after `since`."""
    def read(address: str) -> list[pb.ExecutionEvent]:
        with _rpc.open_channel(address, credentials) as channel:
            reply = pb_grpc.WorkerStub(channel).GetTimeline(pb.GetTimelineRequest(since=since),
                                                            timeout=timeout)
        return list(reply.events)

    with futures.ThreadPoolExecutor(TIMELINE_THREADS) as pool:
        jobs = {island: [pool.submit(read, a) for a in hosts] for island, hosts in addresses.items()}
        return {island: [job.result() for job in island_jobs] for island, island_jobs in jobs.items()}


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """p50 and p99 (milliseconds, from seconds), or None without values."""
    values = np.asarray(list(values), dtype=float)
    if not values.size:
        return None
    return {f"p{p}": float(np.percentile(values, p) * 1e3) for p in PERCENTILES}


def point_figures(submissions: Sequence, timelines: dict[int, list[list[pb.ExecutionEvent]]],
                  per_execution: int) -> dict:
    """Busy, throughput and latencies under load of one point (see the module docstring);
    `submissions` are benchmarks.scale_workload.Submission, in order; an execution holds
    `per_execution` computations (a Fused program: all of them). Under load the client's
    answers come per batch of commands, so the "ordered" stage is left out here (the probe,
    `latencies`, has it)."""
    if not submissions:
        return {"computations": 0}
    t0 = min(s.submitted for s in submissions)
    events = {island: [[e for e in host if e.start >= t0] for host in hosts]
              for island, hosts in timelines.items()}
    ends = [e.end for hosts in events.values() for host in hosts for e in host]
    if not ends:
        return {"computations": 0}
    t_end = max(ends)
    window = max(t_end - t0, 1e-9)
    busy = [sum(min(e.end, t_end) - max(e.start, t0) for e in host) / window
            for hosts in events.values() for host in hosts]
    steady, startup = [], []
    for hosts in events.values():  # each island from the moment all its hosts are under way
        firsts = [min(e.start for e in host) for host in hosts if host]
        if len(firsts) < len(hosts) or not firsts:
            continue
        begin, end = max(firsts), max(e.end for host in hosts for e in host)
        startup.append(begin - t0)
        if end > begin:
            steady += [sum(min(e.end, end) - max(e.start, begin) for e in host
                           if e.end > begin) / (end - begin) for host in hosts]
    executions = sum(len(hosts[0]) for hosts in events.values() if hosts)
    durations = [e.end - e.start for hosts in events.values() for e in hosts[0]]
    figures = {
        "computations": executions * per_execution,
        "window_s": window,
        "busy": statistics.fmean(busy),
        "busy_min": min(busy),
        "busy_steady": statistics.fmean(steady) if steady else None,
        "startup_ms": max(startup) * 1e3 if startup else None,
        "computations_per_s": executions * per_execution / window,
        "computation_ms": (statistics.median(durations) / per_execution * 1e3 if durations
                           else None),
    }
    loaded = latencies(submissions, timelines)
    figures["loaded_latency_ms"] = {k: v for k, v in loaded.items() if "ordered" not in k}
    return figures


def latencies(submissions: Sequence, timelines: dict[int, list[list[pb.ExecutionEvent]]]
              ) -> dict:
    """Per-stage latency percentiles of the commands (see the module docstring)."""
    t0 = min((s.submitted for s in submissions), default=0.0)
    events = {island: [[e for e in host if e.start >= t0] for host in hosts]
              for island, hosts in timelines.items()}
    stages: dict[str, list[float]] = {k: [] for k in (
        "submit_to_ordered", "submit_to_last_received", "submit_to_start",
        "ordered_to_last_received", "last_received_to_start")}
    per_island: dict[int, tuple[list[int], list[dict[int, pb.ExecutionEvent]]]] = {}
    for island, hosts in events.items():
        by_sequence = [{e.sequence: e for e in host} for host in hosts]
        per_island[island] = (sorted(by_sequence[0]) if by_sequence else [], by_sequence)
    previous: dict[int, int] = {}
    for s in submissions:
        sequence = s.output.sequence
        last, previous[s.island] = previous.get(s.island, 0), sequence
        order, hosts = per_island.get(s.island, ([], []))
        i = bisect.bisect_right(order, last)  # the command's first execution
        if not sequence or i >= len(order) or order[i] > sequence or not s.ticket.answered_at:
            continue
        first = order[i]
        runs = [host[first] for host in hosts if first in host]
        received = max(e.received for e in runs)
        start = max(e.start for e in runs)
        ordered = s.ticket.answered_at
        for key, value in (("submit_to_ordered", ordered - s.submitted),
                           ("submit_to_last_received", received - s.submitted),
                           ("submit_to_start", start - s.submitted),
                           ("ordered_to_last_received", received - ordered),
                           ("last_received_to_start", start - received)):
            stages[key].append(value)
    return {key: percentiles(values) for key, values in stages.items()}


def crossing(durations_ms: Sequence[float], busy: Sequence[float], fraction: float = 0.95
             ) -> dict[str, float | None]:
    """The break-even of one curve: the smallest duration measured with busy >= `fraction`, and
    the duration where busy crosses it, interpolated in log(duration) (None if it never does)."""
    points = sorted((d, b) for d, b in zip(durations_ms, busy) if b is not None)
    reached = [d for d, b in points if b >= fraction]
    interpolated = None
    for i, (d, b) in enumerate(points):
        if b >= fraction:
            if i == 0:
                interpolated = d
            else:
                (d0, b0) = points[i - 1]
                t = (fraction - b0) / (b - b0) if b != b0 else 1.0
                interpolated = float(np.exp(np.log(d0) + t * (np.log(d) - np.log(d0))))
            break
    return {"smallest_measured_ms": reached[0] if reached else None,
            "interpolated_ms": interpolated}
