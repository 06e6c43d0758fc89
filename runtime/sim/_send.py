"""Copies of arrays from simulated hosts to other slices' hosts (a SendInstruction).

As on real hosts (runtime.worker.worker), the send is taken up in the island's order, after the array's
producer, and streamed host to host over the Worker service's PutArray, never through the
controller. The source slice's first host sends. An array with data (a small put) travels as data,
gathered from the slice's hosts (all in this process: a simulated island lives in one process);
any other array travels as shapes only (runtime.sim._arrays).

The island's fan-out tree (runtime.worker.forward) goes through here too: a Dispatch passed on to
a host of this process is handed over in memory, to any other host over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from proto import wire as _wire
from proto.errors import PathwaysError
from runtime.sim._arrays import SimArray, dataless_chunks
from runtime.worker import copy_plan
from runtime.worker import forward as _forward
from runtime.worker.defaults import TRANSFER_TIMEOUT_S

if TYPE_CHECKING:
    from runtime.sim._host import SimHost

log = logging.getLogger(__name__)



class Transfers:
    """Sends arrays out of one process's simulated hosts; one channel per destination host."""

    def __init__(self, credentials: _auth.Credentials) -> None:
        self.credentials = credentials
        self._metadata = _rpc.credential_metadata(credentials)
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.WorkerStub]] = {}
        self._streams: set[asyncio.Task] = set()  # sends and forwarded calls under way
        self._relays: dict[tuple[int, int], _forward.Relays] = {}  # per forwarding host
        #: Per forwarding host: where the hosts below it stood when a batch reached them.
        self._found: dict[tuple[int, int], list[pb.HostPosition]] = {}
        #: This process's hosts by address: the fan-out tree reaches them in memory.
        self.local: dict[str, SimHost] = {}

    async def send(self, host: SimHost, send: pb.SendInstruction) -> None:
        """Takes up a send in the island's order: pins the source (waiting for its producer) and
        starts streaming it; the stream goes on while the executor moves on."""
        if send.source_slice_id and not host.holds_slice(send.source_slice_id):
            return  # no device of the source slice here: another host sends
        error: PathwaysError | None = None
        whole = None
        try:
            value = await host.store.get(send.array_id, host.config.input_timeout_s)
            hosts = [host.host]
            if send.source_slice_id:
                info = await host.slice_info(send.source_slice_id)
                hosts = sorted({d.host for d in info.devices})
            if hosts[0] != host.host:
                return  # the slice's first host sends
            whole = await _gather(host, send.array_id, value, hosts)
        except PathwaysError as exc:
            error = exc
        task = asyncio.get_running_loop().create_task(self._stream(host, whole, error, send))
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    async def _stream(self, host: SimHost, whole: np.ndarray | None,
                      error: PathwaysError | None, send: pb.SendInstruction) -> None:
        dest, info = send.destination, send.destination_slice
        what = f"transfer of array {send.array_id} from host {host.island}.{host.host}"
        try:
            targets = ([(address, None) for host, address in enumerate(info.host_addresses)
                        if any(d.host == host for d in info.devices)] if error is not None else
                       [(address, mine) for _, address, mine in
                        copy_plan.whole_shares(dest.shape, info, dest.sharding)])
            for address, mine in targets:
                if mine is None:
                    chunks = [pb.ArrayChunk(spec=dest, error=f"{what} failed: {error}")]
                else:
                    chunks = (list(_wire.iter_chunks(dest, [(index, ps, whole[_wire.as_slices(
                        index)]) for index, ps in mine])) if whole is not None
                        else dataless_chunks(dest, mine))
                await self._stub(address).PutArray(iter(chunks), timeout=TRANSFER_TIMEOUT_S,
                                                   metadata=self._metadata)
        except grpc.RpcError as err:  # e.g. the receiver stopped; its reads report the loss
            log.warning("%s to slice %d failed: %s", what, dest.sharding.slice_id,
                        err.code().name)
        except Exception:  # the receiver's execution times out and reports it
            log.exception("%s to slice %d failed", what, dest.sharding.slice_id)

    def forward(self, host: SimHost, request: pb.DispatchRequest, timeout: float
                ) -> list[pb.HostPosition]:
        """Passes a Dispatch `host` received on down the island's fan-out tree
        (runtime.worker.forward) and returns at once: where the hosts below stood when what
        `host` passed on earlier reached them (or why it did not).

        The running hosts of this process below it get the batch, with their subtrees in this
        process, on the loop's next turn, each taking it in as its own Dispatch would
        (`_hand_over`). Real hosts forward over gRPC, each from its own cores, in parallel: in
        one process of hundreds of simulated hosts a call per host would queue behind the
        others on one core, so the simulation spends no more than the receipt itself per host
        (64 hosts: 0.4 ms, against 0.8 with a relay and a request per host, and 3 ms with a
        loop turn per level). Not inside `host`'s handler: its reply would wait for the whole
        subtree (at 512 hosts, 35 ms computations, the devices were then busy 0.76-0.82 of the
        time, not 0.98). Any other host below gets it over gRPC from a relay, as from a real
        host."""
        key = (host.island, host.host)
        found = self._found.pop(key, [])
        here, elsewhere = [], []
        for target in request.forward:
            (here if self._running(target) else elsewhere).append(target)
        if here:
            asyncio.get_running_loop().call_soon(self._hand_over, key, request, here, timeout)
        relays = self._relays.get(key)
        if elsewhere and relays is None:
            relays = self._relays[key] = _forward.Relays(self._start_forward)
        if relays is not None:  # also collects what its calls found since
            found += relays.forward(_with_forward(request, elsewhere) if here else request,
                                    timeout)
        return found

    def _running(self, target: pb.ForwardTarget) -> bool:
        local = self.local.get(target.address)
        return local is not None and not local.stopped

    def _hand_over(self, key: tuple[int, int], request: pb.DispatchRequest,
                   targets: list[pb.ForwardTarget], timeout: float) -> None:
        """Every host of the subtrees of `targets` in this process takes the batch in
        (SimHost.take); where each then stands goes back with the next reply of host `key`. A
        host with hosts below it elsewhere passes the batch on to those itself (`forward`)."""
        found = self._found.setdefault(key, [])
        while targets:
            target = targets.pop()
            host = self.local.get(target.address)
            try:
                if host is None or host.stopped:  # since `forward` looked
                    raise RuntimeError("the host stopped")
                received = host.take(request.controller_id, request.instructions, request.epoch)
            except Exception as exc:  # what its gRPC handler would have answered with
                found.extend(_forward.positions(target, None,
                                                _forward.describe_error(exc, target)))
                continue
            found.append(pb.HostPosition(host=target.host, received=received,
                                         executed=host.executed))
            below = target.forward
            if all(self._running(t) for t in below):
                targets.extend(below)
            else:
                found.extend(self.forward(host, _with_forward(request, below), timeout))

    def _start_forward(self, request: pb.DispatchRequest, target: pb.ForwardTarget,
                       timeout: float, done: _forward.Done) -> None:
        """Starts one forwarded Dispatch of a relay (to a host not running in this process)."""
        async def call() -> None:
            try:
                reply = await self._stub(target.address).Dispatch(
                    request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                done(None, _forward.describe_error(err, target))
                return
            except asyncio.CancelledError:  # the process is stopping
                done(None, _forward.describe_error(RuntimeError("cancelled"), target))
                raise
            done(reply, "")

        task = asyncio.get_running_loop().create_task(call())
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = _rpc.open_aio_channel(address, self.credentials)
            entry = self._channels[address] = (channel, pb_grpc.WorkerStub(channel))
        return entry[1]

    async def close(self) -> None:
        for task in list(self._streams):
            task.cancel()
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()


def _with_forward(request: pb.DispatchRequest, forward: Sequence[pb.ForwardTarget]
                  ) -> pb.DispatchRequest:
    """`request`'s batch, to be passed on to `forward`'s subtrees instead of its own."""
    return pb.DispatchRequest(controller_id=request.controller_id, epoch=request.epoch,
                              instructions=request.instructions, forward=forward)


async def _gather(host: SimHost, array_id: int, value: SimArray, hosts: list[int]
                  ) -> np.ndarray | None:
    """The whole of an array held by `hosts` (this one first), when it has data; None when it is
    shapes only."""
    parts = [value]
    for other in hosts[1:]:
        peer = host.peer(other)
        if peer is None:
            return None
        parts.append(await peer.store.get(array_id, host.config.input_timeout_s))
    if not all(part.has_data for part in parts):
        return None
    whole = np.empty(value.shape, value.dtype)
    covered = set()
    for part in parts:
        for index, data in part.shards.items():
            whole[_wire.as_slices(index)] = data
            covered.add(index)
    if sum(math.prod(_wire.shard_shape(index)) for index in covered) != math.prod(value.shape):
        return None
    return whole
