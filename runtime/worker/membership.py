"""A host's membership of its controller's cluster: registration, and registering again after the
controller restarts.

A controller pings every registered host twice a second (runtime.controller.controller), so a host that has
heard nothing from any controller for `silence_s` seconds knows it is registered nowhere: the
controller restarted (and knows no hosts), or was replaced. It registers again, retrying until a
controller answers; the new controller's first dispatch then gives the host a fresh order (its old
state, which belonged to sessions of the old controller, is dropped: runtime.worker.worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from runtime.worker.defaults import SETTINGS as _WORKER

log = logging.getLogger(__name__)

#: Silence from every controller after which a host registers again. Well above the controller's
#: heartbeat interval (0.5 s), so a busy controller does not make its hosts re-register.
SILENCE_S = _WORKER.registration_silence_s
#: Deadline of one registration attempt, and pause between attempts.
ATTEMPT_TIMEOUT_S = _WORKER.registration_attempt_timeout_s
RETRY_PAUSE_S = _WORKER.registration_retry_s


def register(address: str, info: pb.HostInfo, credentials: _auth.Credentials | None = None,
             timeout: float = 60.0) -> None:
    """Registers a host with the controller at `address`, retrying until `timeout` while no
    controller answers there. Other errors (a refused registration) raise at once."""
    deadline = time.monotonic() + timeout
    with _rpc.open_channel(address, credentials) as channel:
        stub = pb_grpc.ControllerStub(channel)
        while True:
            try:
                stub.RegisterHost(pb.RegisterHostRequest(host=info),
                                  timeout=min(ATTEMPT_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
                return
            except grpc.RpcError as err:
                if (err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                       grpc.StatusCode.DEADLINE_EXCEEDED)
                        or time.monotonic() > deadline):
                    raise
                time.sleep(RETRY_PAUSE_S)


def unregister(address: str, info: pb.HostInfo, credentials: _auth.Credentials | None = None,
               timeout: float = 1.0) -> None:
    """Tells the controller a host is leaving; best effort (the controller may be gone already)."""
    try:
        with _rpc.open_channel(address, credentials) as channel:
            pb_grpc.ControllerStub(channel).UnregisterHost(pb.UnregisterHostRequest(
                island=info.island, host=info.host, address=info.address), timeout=timeout)
    except grpc.RpcError:
        pass


def report_due(silent_s: float, silence_s: float = SILENCE_S) -> bool:
    """Whether a host silent for `silent_s` should send a progress report now: after half the
    silence limit. A report the controller takes counts as its contact. The hosts of a fan-out
    tree report only every progress_idle_tree_s (10 s) when idle, and hear the controller through
    the heartbeat's empty Dispatch (scheduler.delivery's keep_alive); when a controller too busy
    to send it in time falls behind, their own reports keep them registered (without them: 139
    of 1,024 simulated hosts registered again in the drain of a busy benchmark point, three
    islands idle and unreached for 3 s)."""
    return silence_s / 2 <= silent_s < silence_s


class Membership:
    """Keeps one host registered with the controller at `address`.

    `info()` describes the host; `last_contact()` is the time.monotonic() of the last call a
    controller made to it (ping or dispatch) or report it took; `report()`, if given, sends the
    host's next progress report now (`report_due`). `start()` registers (raising if no controller
    answers within `timeout`), then a daemon thread registers again after SILENCE_S of silence.
    """

    def __init__(self, address: str, info: Callable[[], pb.HostInfo],
                 last_contact: Callable[[], float], credentials: _auth.Credentials | None = None,
                 *, silence_s: float = SILENCE_S,
                 report: Callable[[], None] | None = None) -> None:
        self.address, self._info, self._last_contact = address, info, last_contact
        self.credentials, self.silence_s, self._report = credentials, silence_s, report
        self.registrations = 0
        self._registered_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="membership")

    def start(self, timeout: float = 60.0) -> None:
        register(self.address, self._info(), self.credentials, timeout)
        self._registered()
        self._thread.start()

    def _registered(self) -> None:
        self.registrations += 1
        self._registered_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.silence_s / 6):
            silent = time.monotonic() - max(self._last_contact(), self._registered_at)
            if report_due(silent, self.silence_s) and self._report is not None:
                self._report()
            if silent < self.silence_s:
                continue
            log.warning("no controller has contacted this host for %.1f s: registering again with "
                        "%s", silent, self.address)
            try:
                register(self.address, self._info(), self.credentials, ATTEMPT_TIMEOUT_S)
            except grpc.RpcError as err:
                log.warning("registration with %s failed: %s", self.address, err.code().name)
                self._registered_at = time.monotonic()  # try again after another silence
                continue
            self._registered()

    def stop(self, unregister_host: bool = True) -> None:
        """Stops watching; tells the controller the host leaves unless told not to."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=ATTEMPT_TIMEOUT_S + 1)
        if unregister_host:
            unregister(self.address, self._info(), self.credentials)
