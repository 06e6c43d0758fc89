"""Forwarding a Dispatch down the island's fan-out tree (scheduler/fanout.py): the controller sends
each batch of the island's order to a few hosts, and each passes the same request on to the hosts
its `forward` list names (with their own lists). So the order reaches an island of n hosts with a
few controller messages instead of n, and every host still gets the same instructions.

A host replies to its Dispatch as soon as it has taken the batch in and handed it to its relays,
without waiting for the hosts below it: a slow subtree holds neither this host's next batch nor
its other subtrees. Each `Relay` (one per host below) keeps at most one forwarded call in flight,
so batches arrive in order, and merges what arrives meanwhile into one request (a subtree that
fell behind catches up in one call). What the calls found, where each host below stands or which
one could not be reached, goes back up with this host's next reply (`DispatchReply.forwarded`);
the hosts' own progress reports tell the controller the same, and a host the tree does not bring
a batch in time gets it from the controller directly (scheduler.delivery), so a lost reply never
hangs the island.

Shared by real hosts (`Forwarder`, gRPC futures) and simulated ones (runtime.sim, asyncio): they
differ only in how a call is started (`Forwarder.start`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from runtime.worker.defaults import SETTINGS as _WORKER

#: Most bytes of instructions a relay merges into one forwarded request.
MERGE_BYTES = _WORKER.forward_merge_bytes

#: Called once when a forwarded call ends: its reply, or (None, why it failed).
Done = Callable[[pb.DispatchReply | None, str], None]


def subtree(target: pb.ForwardTarget) -> list[int]:
    """Every host of `target`'s subtree, itself first."""
    hosts = [target.host]
    for child in target.forward:
        hosts.extend(subtree(child))
    return hosts


def positions(target: pb.ForwardTarget, reply: pb.DispatchReply | None, error: str = ""
              ) -> list[pb.HostPosition]:
    """Where the hosts of `target`'s subtree stand after a forwarded call: its reply's figures,
    or (it failed) `error` for it and for the hosts below it, which it did not reach."""
    if reply is None:
        return [pb.HostPosition(host=host, error=error if host == target.host else
                                f"not reached: host {target.host} above it failed ({error})")
                for host in subtree(target)]
    return [pb.HostPosition(host=target.host, received=reply.received, executed=reply.executed),
            *reply.forwarded]


def describe_error(err: grpc.RpcError | Exception, target: pb.ForwardTarget) -> str:
    """A forwarded call's failure, naming the host."""
    if isinstance(err, grpc.RpcError):
        err = f"{err.code().name}: {err.details()}"
    return f"forwarding the order to host {target.host} ({target.address}) failed: {err}"


class _Batch:
    """Instructions waiting to be forwarded to one host, for one controller and epoch."""

    def __init__(self, request: pb.DispatchRequest, nbytes: int) -> None:
        self.controller_id, self.epoch = request.controller_id, request.epoch
        self.instructions = list(request.instructions)
        self.nbytes = nbytes

    def absorb(self, request: pb.DispatchRequest, nbytes: int) -> bool:
        """Takes a later request (of `nbytes`) in, in sequence order and without repeats, if it
        belongs to the same order and the sum stays under MERGE_BYTES; False if it must travel
        on its own."""
        if (request.controller_id != self.controller_id or request.epoch != self.epoch
                or self.nbytes + nbytes > MERGE_BYTES):
            return False
        later = request.instructions
        if later and self.instructions and later[0].sequence <= self.instructions[-1].sequence:
            by_sequence = {ins.sequence: ins for ins in self.instructions}
            by_sequence.update((ins.sequence, ins) for ins in later)  # a resend: once each
            self.instructions = [by_sequence[q] for q in sorted(by_sequence)]
        else:
            self.instructions.extend(later)
        self.nbytes += nbytes
        return True

    def request(self, target: pb.ForwardTarget) -> pb.DispatchRequest:
        return pb.DispatchRequest(controller_id=self.controller_id, epoch=self.epoch,
                                  instructions=self.instructions, forward=target.forward)


class Relay:
    """The order's way from this host to one host below it: one forwarded call at a time, in
    order; what comes meanwhile waits, merged. `start(request, target, timeout, done)` begins a
    call and calls `done` once when it ends (on any thread)."""

    def __init__(self, start: Callable[[pb.DispatchRequest, pb.ForwardTarget, float, Done], None]
                 ) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._waiting: collections.deque[list] = collections.deque()  # [batch, target, timeout]
        self._busy = False
        self._positions: list[pb.HostPosition] = []

    def pass_on(self, request: pb.DispatchRequest, target: pb.ForwardTarget,
                timeout: float, nbytes: int | None = None) -> None:
        """Forwards `request` (of `nbytes`, its ByteSize) to `target` (with `target`'s own
        subtree) after what is waiting."""
        nbytes = request.ByteSize() if nbytes is None else nbytes
        with self._lock:
            last = self._waiting[-1] if self._waiting else None
            if last is not None and last[0].absorb(request, nbytes):
                last[1], last[2] = target, timeout  # the latest subtree and deadline
            else:
                self._waiting.append([_Batch(request, nbytes), target, timeout])
            if self._busy:
                return
            self._busy = True
            batch, target, timeout = self._waiting.popleft()
        self._send(batch, target, timeout)

    def _send(self, batch: _Batch, target: pb.ForwardTarget, timeout: float) -> None:
        def done(reply: pb.DispatchReply | None, error: str) -> None:
            self._done(target, reply, error)

        try:
            self._start(batch.request(target), target, timeout, done)
        except Exception as exc:  # e.g. its channel was closed
            done(None, describe_error(exc, target))

    def _done(self, target: pb.ForwardTarget, reply: pb.DispatchReply | None,
              error: str) -> None:
        with self._lock:
            self._positions.extend(positions(target, reply, error))
            if error:  # the controller fails the island on it; later batches start afresh
                self._waiting.clear()
            if not self._waiting:
                self._busy = False
                return
            batch, target, timeout = self._waiting.popleft()
        self._send(batch, target, timeout)

    def take_positions(self) -> list[pb.HostPosition]:
        """What the calls ended since the last take found (each host below, or its failure)."""
        with self._lock:
            taken, self._positions = self._positions, []
            return taken


class Relays:
    """This host's relays, one per host below it (by address), and what they found."""

    def __init__(self, start: Callable[[pb.DispatchRequest, pb.ForwardTarget, float, Done], None]
                 ) -> None:
        self._start = start
        self._relays: dict[str, Relay] = {}
        self._lock = threading.Lock()

    def forward(self, request: pb.DispatchRequest, timeout: float) -> list[pb.HostPosition]:
        """Passes `request` on to each host of its `forward` list (returns at once); the
        positions every relay's calls found since the last Dispatch."""
        targets: Sequence[pb.ForwardTarget] = request.forward
        with self._lock:
            relays = []
            for target in targets:
                relay = self._relays.get(target.address)
                if relay is None:
                    relay = self._relays[target.address] = Relay(self._start)
                relays.append(relay)
            every = list(self._relays.values())
        nbytes = request.ByteSize() if targets else 0  # measured once for all of them
        for relay, target in zip(relays, targets):
            relay.pass_on(request, target, timeout, nbytes)
        return [position for relay in every for position in relay.take_positions()]


class Forwarder:
    """Passes Dispatch requests on to other hosts of the island (a real host's side): a relay
    per host below, its calls gRPC futures; one channel per host, kept until `close`."""

    def __init__(self, credentials: _auth.Credentials | None) -> None:
        self.credentials = credentials
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.WorkerStub]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._relays = Relays(self.start)

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        with self._lock:
            if self._closed:  # the host is stopping: no new channel
                raise ValueError("the host is stopping")
            entry = self._stubs.get(address)
            if entry is None:
                channel = _rpc.open_channel(address, self.credentials)
                entry = self._stubs[address] = (channel, pb_grpc.WorkerStub(channel))
            return entry[1]

    def start(self, request: pb.DispatchRequest, target: pb.ForwardTarget, timeout: float,
              done: Done) -> None:
        """Starts one forwarded call; `done` runs on gRPC's thread when it ends."""
        call = self._stub(target.address).Dispatch.future(request, timeout=timeout)

        def finished(call: grpc.Future) -> None:
            try:
                reply = call.result()
            except (grpc.RpcError, grpc.FutureCancelledError) as err:
                done(None, describe_error(err, target))
                return
            done(reply, "")

        call.add_done_callback(finished)

    def forward(self, request: pb.DispatchRequest, timeout: float) -> list[pb.HostPosition]:
        """See Relays.forward (a request without a `forward` list only collects positions)."""
        return self._relays.forward(request, timeout)

    def close(self) -> None:
        """Closes the channels (calls on them end as cancelled)."""
        with self._lock:
            self._closed = True
            stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            channel.close()
