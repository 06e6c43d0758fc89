"""A host's link reports to its scheduler through LinkEvents only (scheduler.delivery), and a
lost host takes one path: the link's report, the controller's health, the island's failure."""

import threading
import time

import grpc

from proto import pathways_pb2 as pb
from proto.config import SchedulerConfig
from proto.errors import HostLostError
from runtime.worker.distributed import free_port
from scheduler import GangScheduler
from scheduler.delivery import HostLink


class Events:
    """A scheduler as a link sees it (LinkEvents), recording the reports."""

    island, controller_id, epoch = 0, "controller", 0
    config = SchedulerConfig()

    def __init__(self):
        self.lost, self.progress = [], []
        self.reported = threading.Event()

    def open_channel(self, address):
        return grpc.insecure_channel(address)

    def on_progress(self, host, executed, received=0, completed=(), hang="", arrived=()):
        self.progress.append((host, executed, received))

    def on_link_lost(self, host, reason):
        self.lost.append((host, reason))
        self.reported.set()


def test_a_link_to_a_host_that_is_gone_reports_its_loss_once_and_drops_its_queue():
    events = Events()
    link = HostLink(events, 3, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        link.send([pb.Instruction(sequence=1, delete=pb.DeleteInstruction(array_ids=[1]))])
        assert events.reported.wait(30)
        time.sleep(0.2)  # a second report, if there were one, would come now
        ((host, reason),) = events.lost
        assert host == 3 and reason.startswith("dispatch failed: UNAVAILABLE")
        assert link.failed == reason and link.pending() == 0
        link.send([pb.Instruction(sequence=2, delete=pb.DeleteInstruction(array_ids=[2]))])
        assert link.pending() == 0  # a failed link takes nothing more
        assert events.progress == []
    finally:
        link.close()
        link.join(5)


class _FailedLink:
    def __init__(self, scheduler, host, address):
        self.host, self.address = host, address
        self.acked = self.executed = 0
        self.failed = ""

    def send(self, ops):
        pass

    def pending(self):
        return 0

    def close(self):
        pass

    def join(self, timeout):
        pass


def test_a_lost_link_goes_to_the_controllers_health_which_fails_the_island_once():
    reports = []

    def health(island, host, reason):  # as runtime.controller.health.report_host_lost does
        reports.append((island, host, reason))
        scheduler.fail(HostLostError(f"host {island}.{host} (fake:0) of island {island} was "
                                     f"lost: {reason}"))

    scheduler = GangScheduler(0, "controller", health, link_factory=_FailedLink)
    try:
        scheduler.set_host(0, "fake:0")
        scheduler._links[0].failed = "dispatch failed: UNAVAILABLE"
        scheduler.on_link_lost(0, "dispatch failed: UNAVAILABLE")
        assert reports == [(0, 0, "dispatch failed: UNAVAILABLE")]
        assert isinstance(scheduler.failure, HostLostError)
        assert "of island 0 was lost" in str(scheduler.failure)  # the health's report, alone
    finally:
        scheduler.close()


def test_a_lost_link_of_a_host_the_health_does_not_know_still_fails_the_island():
    scheduler = GangScheduler(0, "controller", lambda *report: None, link_factory=_FailedLink)
    try:
        scheduler.set_host(0, "fake:0")
        scheduler._links[0].failed = "progress stream lost: gone"
        scheduler.on_link_lost(0, "progress stream lost: gone")
        assert isinstance(scheduler.failure, HostLostError)
        assert "progress stream lost: gone" in str(scheduler.failure)
    finally:
        scheduler.close()
