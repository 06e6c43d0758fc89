"""What hosts report back to the gang scheduler through their links (scheduler.delivery's
LinkEvents, coalesced per island: scheduler.coalesce): how far each has received and executed
the order, the measured durations that refine cost estimates and charge tenants, a link's loss,
and the heartbeat's pings; and what follows from them: how much work the window holds ahead of
the hosts, and how often each host reports. A part of GangScheduler (scheduler.gang)."""

from __future__ import annotations

import concurrent.futures
import math
import statistics
import time
from collections.abc import Sequence

from proto import pathways_pb2 as pb
from proto.errors import DeadlineExceededError, HostLostError, ResourceExhaustedError
from scheduler.coalesce import HostReport


class Progress:
    """Progress accounting for a GangScheduler (a mixin: the state is the scheduler's)."""

    @property
    def window(self) -> float:
        """Estimated device seconds ordered ahead of the slowest host now: `window_s`, or more
        while the order takes longer than that to reach the island's last host and its report to
        come back (a window shorter than the trip leaves the devices idle between refills; many
        hosts and busy ones make the trip long), up to `max_window_s`. The trip is the median of
        the latest `window_trip_samples`: neither the odd batch that found every queue empty
        nor the one stuck behind a stall."""
        if not self._trip_s:  # no trip measured yet (no host has acknowledged work)
            return self.window_s
        trips = self.config.window_trips * self._trip_s + self.report_interval
        return max(self.window_s, min(trips, self.config.max_window_s))

    @property
    def report_interval(self) -> float:
        """Least seconds between two progress reports of a host: `progress_interval_s`, or a
        power of two times it on a big island, so its hosts together send at most
        `progress_island_rate` a second (every report costs the controller the same; the
        scheduler needs the slowest host's). Powers of two: the streams re-open at few sizes."""
        base = self.config.progress_interval_s
        wanted = len(self._links) / self.config.progress_island_rate
        return base * 2 ** max(0, math.ceil(math.log2(wanted / base))) if wanted > base else base

    def on_link_lost(self, host: int, reason: str) -> None:
        """A link found its host unreachable (scheduler.delivery.LinkEvents). The host's loss
        takes one path, `on_host_failure` (the controller's health: it fails this island's work
        and what other islands expect from it); the island's own failure is only set here when
        that path did not (a host the registry does not know, or one the heartbeat declared lost
        while its island's failure was not yet set)."""
        self.on_host_failure(self.island, host, reason)
        with self.cond:
            if self._failure is None:  # also when the heartbeat declared it lost a moment ago
                self._fail(self._link_failure() or self._host_lost(host, reason))

    def _host_lost(self, host: int, reason: str) -> HostLostError:
        """The island's failure for a lost host, named with its address (lock held)."""
        link = self._links.get(host)
        address = f" ({link.address})" if link is not None else ""
        return HostLostError(f"island {self.island}: host {self.island}.{host}{address} was "
                             f"lost: {reason}")

    def ping(self, host: int, timeout: float, fresh_s: float = 0.0
             ) -> concurrent.futures.Future | None:
        """A heartbeat's ping of a host through its link (scheduler.delivery.HostLink.ping: no
        call when the host was heard from within `fresh_s`), or None for a host without one."""
        with self.cond:
            link = self._links.get(host)
        return None if link is None else link.ping(timeout, fresh_s)

    def keep_alive(self, delay: float = 0.0, quiet_s: float = 0.0) -> None:
        """The heartbeat's contact with the hosts of the island's fan-out tree, which report
        only every `progress_idle_tree_s` when idle: an empty Dispatch to each root `delay`
        seconds from now unless it dispatched within `quiet_s`, passed down the tree
        (HostLink.keep_alive), rather than a report or a Ping per host. Only the links the
        island hands its order to are asked (a relayed host's root's call reaches it)."""
        with self.cond:
            links = list(self._direct)
        for link in links:
            if hasattr(link, "keep_alive"):  # a real link (tests pass fakes)
                link.keep_alive(delay, quiet_s)

    def heard_lately(self, fresh_s: float) -> set[int]:
        """The island's hosts heard from lately (HostLink.heard_lately): the heartbeat makes no
        call to them, nor a future or a report each. Trims the relay log (`trim_relay_log`) in
        the same look at each link, and has each relayed link check what the tree was to bring
        it (HostLink.check_relayed) only when the oldest of that has waited past
        `relay_timeout_s` (the others' waited no longer): one look at each link a heartbeat
        round for the three, where a look each took a quarter of the round's CPU at 1,024
        hosts."""
        now = time.monotonic()
        heard = set()
        with self.cond:
            for host, link in self._links.items():
                if link.heard_lately(fresh_s, now):
                    heard.add(host)
            oldest = self._trim_relay_log_locked()
            late = self.relay_log.waiting_since(oldest)
            overdue = (list(self._links.values())
                       if late is not None and now - late >= self.config.relay_timeout_s else [])
        for link in overdue:
            link.check_relayed()
        return heard

    def _relay(self, ops: Sequence[pb.Instruction]) -> None:
        """Keeps `ops` for the hosts the tree relays (lock held), trimming the log now and
        then (RelayLog.full)."""
        self.relay_log.append(ops)
        if self.relay_log.full():
            self._trim_relay_log_locked()

    def trim_relay_log(self) -> None:
        """Forgets what every relayed host has acknowledged (or got directly) of the relay
        log (scheduler.relaylog). Under the island's lock, as a link's joining or leaving the
        tree and a delivery are: a trim between reading the links and the log would drop what
        a host that joined the tree meanwhile, or one registering again, is owed."""
        with self.cond:
            self._trim_relay_log_locked()

    def _trim_relay_log_locked(self) -> int:
        """`trim_relay_log` with the island's lock held; returns the sequence it trimmed to."""
        owed = [p for p in (getattr(link, "relay_position", lambda: None)()
                            for link in self._links.values()) if p is not None]
        oldest = min(owed) if owed else self.relay_log.last
        self.relay_log.trim(oldest, len(self._links))
        return oldest

    def order_gap(self, host: int, received: int, incarnation: str) -> str:
        """Why a host that registers again from a new process (`incarnation` differs from its
        last registration's) holding the island's order only up to `received` cannot go on, or
        "": it had acknowledged more, and the controller keeps only the history of slices and
        loads to replay, not the order's other instructions, so it would wait for ever for the
        missing ones. (The same process registering again keeps what it holds, whatever it
        reports: its report may be older than its last acknowledgement.)"""
        with self.cond:
            link = self._links.get(host)
            acked = 0 if link is None else link.acked
            known = self._incarnations.get(host, "")
        if not known or not incarnation or incarnation == known or received >= acked:
            return ""
        return (f"it registered again holding the island's order up to #{received}, after "
                f"acknowledging up to #{acked} (its process restarted): the instructions in "
                f"between are gone, so the island restarts")

    def note_progress(self, host: int, executed: int, received: int = 0,
                      completed: Sequence[pb.CompletedExecution] = (), hang: str = "",
                      arrived: Sequence[int] = ()) -> None:
        """Records how far a host has received and executed the order (from a ping, or a test
        standing in for a link): one report of `note_reports`."""
        self.note_reports([HostReport(host, executed, received, list(completed), hang,
                                      list(arrived))])

    def note_reports(self, reports: Sequence[HostReport]) -> None:
        """Records how far hosts have received and executed the order (their links' reports,
        coalesced per turn of the link loop: scheduler.coalesce), the measured durations of
        their executions, and the arrays whose data reached them (or failed to); then finds the
        slowest host and refills the window once for them all."""
        for report in reports:
            if report.arrived:
                self.readiness.arrived(self.island, report.host, report.arrived)
        with self.cond:
            acked = False
            for report in reports:
                link = self._links.get(report.host)
                if link is None:
                    continue
                if report.received > link.acked:  # flush() waits on this
                    link.acked = report.received
                    acked = True
                link.executed = max(link.executed, report.executed)
                if report.contacted:  # a Dispatch reached it through the fan-out tree
                    link.heard_at = time.monotonic()
                for done in report.completed:
                    self._measure(done.sequence, done.seconds)
                self.latency.started(report.completed)
                if report.hang and self._failure is None:
                    self._fail(DeadlineExceededError(report.hang))
            if acked:
                self.cond.notify_all()
            self._recompute_progress()
            self._admit()

    def _measure(self, sequence: int, seconds: float) -> None:
        entry = self._unmeasured.pop(sequence, None)
        if entry is None:
            return  # another host of the island reported it first
        tenant, executable_id, estimate = entry
        tenant.device_seconds += seconds
        self.policy.charge(tenant, seconds - estimate)
        old, smoothing = self._costs.get(executable_id), self.config.cost_smoothing
        self._costs[executable_id] = (seconds if old is None else
                                      (1 - smoothing) * old + smoothing * seconds)

    def _recompute_progress(self) -> None:
        if not self._links:
            return
        trip = self.latency.received_up_to(min(link.acked for link in self._links.values()))
        if trip is not None:
            self._trips.append(trip)
            self._trip_s = statistics.median(self._trips)
        executed = self._slowest = min(link.executed for link in self._links.values())
        if executed > self._executed:
            self._executed = executed
            self._progress_at = time.monotonic()
            while self._inflight and self._inflight[0][0] <= executed:
                self._outstanding_s -= self._inflight.popleft()[1]
            if not self._inflight:
                self._outstanding_s = 0.0

    def flush(self, timeout: float) -> None:
        """Waits until every host has received everything ordered so far."""
        deadline = time.monotonic() + timeout
        with self.cond:
            target = self._sequence
            while True:
                self._raise_if_failed()
                if all(link.acked >= target for link in self._links.values()):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    slow = [h for h, link in self._links.items() if link.acked < target]
                    raise DeadlineExceededError(
                        f"island {self.island}: hosts {slow} did not receive instructions "
                        f"up to #{target} within {timeout:.1f} s")
                self.cond.wait(left)

    def wait_backlog(self, limit: int, timeout: float) -> None:
        """Waits while the slowest host is more than `limit` instructions behind the order, so a
        client that outruns its island waits instead of filling the hosts' memory. Every Execute
        asks every island first: while the island is not near the limit the answer comes from
        the slowest host's place as last computed, without the island's lock (two int reads;
        the lock is the one its reports and orders take)."""
        if self._sequence - self._slowest <= limit // 2:
            return
        deadline = time.monotonic() + timeout
        with self.cond:
            while self._links and self._sequence - min(
                    link.executed for link in self._links.values()) > limit:
                if self._failure is not None or self._link_failure() is not None:
                    return  # nothing more runs there: work for it fails when it is planned
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhaustedError(
                        f"island {self.island} is more than {limit} instructions behind after "
                        f"{timeout:.0f} s")
                self.cond.wait(min(left, 0.1))
