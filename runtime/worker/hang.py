"""Hang diagnosis on multi-host islands.

A computation on a slice spanning hosts completes only when every host of the slice launches it:
its collectives wait for all of them. If one host is elsewhere (its order differs, an input never
arrives, it died), the others wait forever, and XLA cannot be interrupted. A `HangWatchdog` on
each host notices a computation that has run past the worker's `execution_deadline_s`, asks the
slice's other hosts where they are (Ping), and, when some host has not reached the computation,
declares the host hung: the computation's outputs, and everything queued behind it, fail with a
DeadlineExceededError naming the computation, the hosts that reached it and the hosts that did not
(with what each is doing). The report travels to the controller on the progress stream, which fails
the island. A computation that every host is running is only slow: it is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import grpc

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from runtime.worker.defaults import SETTINGS as _WORKER

if TYPE_CHECKING:
    from runtime.worker.worker import Worker

log = logging.getLogger(__name__)

#: How often the watchdog looks at the executor.
WATCH_INTERVAL_S = _WORKER.hang_watch_interval_s
#: Deadline of the pings to the slice's other hosts.
PEER_TIMEOUT_S = _WORKER.peer_ping_timeout_s


class HangWatchdog:
    """Watches one worker's executor; see the module docstring."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._slow: tuple = ()  # the computation last found slow on every host (logged once)
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"watchdog-{worker.island}.{worker.host}")
        self._thread.start()

    def _loop(self) -> None:
        worker = self.worker
        while not self._stop.wait(WATCH_INTERVAL_S):
            if worker.hang:
                return
            state = worker.state.activity
            if state[0] != "running" or time.monotonic() - state[4] < worker.execution_deadline_s:
                continue
            info = worker.slice_info(state[5])
            if info is None or all(d.host == worker.host for d in info.devices):
                continue  # one host: nobody else to wait for
            report = diagnose(worker, state, info)
            if worker.state.activity is not state:
                continue  # it finished while we asked around
            if report:
                worker.executor.declare_hang(report)
                worker.report_soon()
            elif self._slow != state:
                self._slow = state
                log.warning("host %d.%d: %s has run %.0f s, on every host of its slice",
                            worker.island, worker.host, state[1], time.monotonic() - state[4])

    def stop(self) -> None:
        self._stop.set()


def diagnose(worker: Worker, state: tuple, info: pb.SliceInfo) -> str:
    """The hang report for the computation `state` of `worker`, or "" when every host of the
    slice has reached it."""
    _, name, sequence, session, since, slice_id = state
    hosts = sorted({d.host for d in info.devices})
    reached, missing = [f"{worker.island}.{worker.host}"], []
    for host in hosts:
        if host == worker.host:
            continue
        where = f"{worker.island}.{host}"
        address = info.host_addresses[host] if host < len(info.host_addresses) else ""
        try:
            with _rpc.open_channel(address, worker.credentials) as channel:
                peer = pb_grpc.WorkerStub(channel).Ping(pb.PingRequest(),
                                                        timeout=PEER_TIMEOUT_S).host
        except grpc.RpcError as err:
            missing.append(f"{where} (unreachable: {err.code().name})")
            continue
        running = peer.current_state == "running"
        if ((peer.current_sequence, peer.current_name) == (sequence, name) and running) or (
                peer.executed >= sequence and not peer.hang):
            reached.append(where)
        else:
            missing.append(f"{where} ({peer.activity})")
    if not missing:
        return ""
    who = f", session {session}" if session else ""
    waited = time.monotonic() - since
    return (f"{name} (#{sequence}{who}) on slice {slice_id} of island {worker.island} exceeded "
            f"its {worker.execution_deadline_s:g} s deadline after {waited:.1f} s waiting for the "
            f"slice's other hosts: reached by host {', '.join(reached)}; not reached by host "
            f"{', '.join(missing)}")
