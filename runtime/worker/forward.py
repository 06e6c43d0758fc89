"""Forwarding a Dispatch down the island's fan-out tree (scheduler/fanout.py): the controller sends
each batch of the island's order to a few hosts, and each passes the same request on to the hosts
its `forward` list names (with their own lists), then replies with where every host of its
subtree stands, or which one it could not reach. So the order reaches an island of n hosts with a
few controller messages instead of n, and every host still gets the same instructions.

Shared by real hosts (`Forwarder`, gRPC futures) and simulated ones (runtime.sim, asyncio): the
request and reply pieces here, the calls in each.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from runtime.worker.defaults import SETTINGS as _WORKER

#: Time kept back from a forwarded call's deadline for this host's own reply.
REPLY_MARGIN_S = _WORKER.forward_reply_margin_s


def forwarded_request(request: pb.DispatchRequest, target: pb.ForwardTarget
                      ) -> pb.DispatchRequest:
    """The request passed on to `target`: the same instructions, its own subtree."""
    return pb.DispatchRequest(controller_id=request.controller_id, epoch=request.epoch,
                              instructions=request.instructions, forward=target.forward)


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


def describe_error(err: grpc.RpcError, target: pb.ForwardTarget) -> str:
    """A forwarded call's failure, naming the host."""
    return (f"forwarding the order to host {target.host} ({target.address}) failed: "
            f"{err.code().name}: {err.details()}")


class Forwarder:
    """Passes Dispatch requests on to other hosts of the island (a real host's side); one
    channel per target, kept."""

    def __init__(self, credentials: _auth.Credentials | None) -> None:
        self.credentials = credentials
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.WorkerStub]] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                channel = _rpc.open_channel(address, self.credentials)
                entry = self._stubs[address] = (channel, pb_grpc.WorkerStub(channel))
            return entry[1]

    def forward(self, request: pb.DispatchRequest, timeout: float) -> list[pb.HostPosition]:
        """Sends `request` to every target of its `forward` list at once and waits (up to
        `timeout` less a margin) for their replies: the positions of every host below."""
        targets: Sequence[pb.ForwardTarget] = request.forward
        if not targets:
            return []
        deadline = max(0.01, timeout - REPLY_MARGIN_S)
        calls = []
        for target in targets:
            try:
                calls.append(self._stub(target.address).Dispatch.future(
                    forwarded_request(request, target), timeout=deadline))
            except ValueError as err:  # its channel was closed
                calls.append(err)
        out: list[pb.HostPosition] = []
        for target, call in zip(targets, calls):
            try:
                if isinstance(call, ValueError):
                    raise call
                out.extend(positions(target, call.result()))
            except grpc.RpcError as err:
                out.extend(positions(target, None, describe_error(err, target)))
            except ValueError as err:
                out.extend(positions(target, None, f"forwarding the order to host "
                                                   f"{target.host} failed: {err}"))
        return out

    def close(self) -> None:
        """Closes the channels."""
        with self._lock:
            stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            channel.close()

