"""Host-to-host transfers: a Send instruction captures its source at its place in the island's
order (or earlier, once the source is stored: runtime.worker.early_sends), and a transfer thread
streams it to the hosts of the destination slice, to all of them at once (a host on the same
machine reads it from this one's memory, or through a shared-memory segment: proto.transfer),
failing the destination at once when it
cannot."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from proto import same_host as _same_host
from proto import transfer as _transfer
from proto import wire as _wire
from proto.chunk_codec import FramedWorkerStub
from proto.errors import ExecutionError
from runtime.worker import copy_plan
from runtime.worker.defaults import SETTINGS as _WORKER
from runtime.worker.defaults import SLICE_TIMEOUT_S, TRANSFER_TIMEOUT_S
from runtime.worker.early_sends import EarlySends
from runtime.worker.pins import SendPins

if TYPE_CHECKING:
    from runtime.worker.worker import Worker

log = logging.getLogger(__name__)

#: Most destination hosts one copy streams to at once.
MAX_PARALLEL_HOSTS = _WORKER.copy_parallel_hosts


class Transfers:
    """The sends of one host: their thread pool, the sources they pin (runtime.worker.pins) and
    the stubs of the peers they stream to. `worker` is the host whose store, meshes and executor
    state they read."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._peers: dict[str, pb_grpc.WorkerStub] = {}
        self._pool = futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix=f"send-{worker.island}.{worker.host}")
        self.pins = SendPins()  # sources captured by sends, not yet streamed
        self.early = EarlySends(self)  # sends started at receipt

    def send(self, send: pb.SendInstruction, sequence: int) -> None:
        """Captures the source at this place in the island's order; streams it on a transfer thread.

        Nothing later in the order changes what is sent: the send holds the source's buffers (a
        delete only drops the store's reference) and a later computation donating them donates a
        copy instead (runtime.worker.pins). A copy onto this host's own devices is made here, in order,
        into fresh buffers: a copy never shares buffers with its source. A send that fails, here
        or while streaming, fails its destination at once, naming the source and the cause.
        """
        if send.source_slice_id in self._worker._foreign:
            return  # another host of the island holds the array
        if self.early.claim(sequence):
            return  # started at receipt (runtime.worker.early_sends), and captured
        try:
            value = self._worker.store.get(send.array_id, self._worker.input_timeout_s)
            if not value.is_fully_addressable:
                direct = self._direct(value, send, sequence)
                if direct is not None:  # each source host sends its own blocks
                    self.submit_stream(value, send, direct)
                    return
                value = self._gather(value, send, sequence)
                if value is None:
                    return  # the slice's first host sends it
            if self._is_local_copy(send):
                mesh, _ = self._worker.mesh(send.destination.sharding.slice_id, SLICE_TIMEOUT_S)
                sharding = NamedSharding(mesh, _wire.spec_from_proto(send.destination.sharding))
                self._worker.store.set(send.destination.array_id,
                               jax.device_put(value, sharding, may_alias=False), None,
                               ("a copy of array {} (#{})", send.array_id, sequence))
                return
            self.submit_stream(value, send)
        except Exception as exc:
            self._fail_destination(send, exc, set())

    def submit_stream(self, value: jax.Array | np.ndarray, send: pb.SendInstruction,
                      direct: tuple[copy_plan.Shares, int] | None = None) -> None:
        """Streams a captured source on a transfer thread, holding it (runtime.worker.pins)
        until then: all of it, or (`direct`: the shares of a copy from several hosts and its
        put id, runtime.worker.copy_plan) this host's share. RuntimeError when the host is
        stopping."""
        if isinstance(value, jax.Array):
            self.pins.pin(value)
        try:
            self._pool.submit(self._stream, value, send, direct)
        except RuntimeError:  # the host is stopping
            self.pins.unpin(value)
            raise

    def _is_local_copy(self, send: pb.SendInstruction) -> bool:
        """Whether the destination lies entirely on this host's devices."""
        info = send.destination_slice
        return bool(info.devices) and all(d.host == self._worker.host for d in info.devices) and (
            len(info.host_addresses) > self._worker.host
            and info.host_addresses[self._worker.host] == self._worker.address)

    def _gather(self, value: jax.Array, send: pb.SendInstruction,
                sequence: int) -> np.ndarray | None:
        """The whole of an array whose shards lie on several hosts, on the source slice's first
        host (None on the others). When the first host's shards already make up the array
        (replicated over the hosts), from them; else every host of the slice runs, at the same
        place in the island's order, a computation replicating the array over the slice, whose
        collectives span the hosts (and whose hang, if a host never comes, the watchdog reports)."""
        mesh, info = self._worker.mesh(send.source_slice_id)
        first = min(d.host for d in info.devices)
        first_holds = _held_by(value, [d for d, where in zip(mesh.devices.flat, info.devices)
                                       if where.host == first])
        if first_holds is not None:  # the first host holds all of it (replicated over the hosts)
            return first_holds() if self._worker.host == first else None
        self._worker._inflight.drain()  # collectives: the only execution in flight
        self._worker.state.activity = ("running", f"gather of array {send.array_id} for a transfer", sequence,
                          0, time.monotonic(), send.source_slice_id)
        try:
            replicated = _replicator(NamedSharding(mesh, PartitionSpec()))(value)
            replicated.block_until_ready()
        except Exception as exc:
            raise ExecutionError(f"gathering array {send.array_id} on host "
                                 f"{self._worker.island}.{self._worker.host} for a transfer failed: {exc}") from exc
        if self._worker.host != min(d.host for d in info.devices):
            return None
        return np.asarray(replicated.addressable_data(0))

    def _direct(self, value: jax.Array, send: pb.SendInstruction, sequence: int
                ) -> tuple[copy_plan.Shares, int] | None:
        """Who sends what of an array on several hosts, when no gather is needed
        (runtime.worker.copy_plan), with the copy's put id; None when the array must be
        gathered first. Every host of the source slice decides the same."""
        mesh, info = self._worker.mesh(send.source_slice_id)
        sharding = value.sharding
        if not isinstance(sharding, NamedSharding) or sharding.mesh != mesh:
            return None
        shares = copy_plan.direct_shares(
            value.shape, _wire.spec_to_proto(send.source_slice_id, sharding.spec), info,
            send.destination.sharding, send.destination_slice)
        return None if shares is None else (shares, copy_plan.put_id(send, sequence))

    def _stream(self, value: jax.Array | np.ndarray, send: pb.SendInstruction,
                direct: tuple[copy_plan.Shares, int] | None = None) -> None:
        """Streams a captured source to the hosts of the destination slice, to all at once (each
        its own shards, over its own link), then lets it go. With `direct`, only this host's
        share, each destination host's shards as one part of a put from several hosts."""
        dest = send.destination
        delivered: set[int] = set()
        sender = _same_host.LocalSender(value)  # hosts of this machine
        regions: list[_transfer.Regions] = []  # the others': made once, by the first to stream

        def deliver(host: int, address: str, mine, part: tuple[int, int]) -> None:
            if not sender.send(self._peer(address), address, dest, mine, TRANSFER_TIMEOUT_S,
                               part):
                with self._lock:
                    if not regions:
                        regions.append(_transfer.Regions(value))
                _transfer.stream_put(self._peer(address), dest, [
                    (index, ps, regions[0].get(index)) for index, ps in mine],
                    TRANSFER_TIMEOUT_S, address=address, part=part)
            with self._lock:
                delivered.add(host)

        failure: Exception | None = None
        try:
            targets = self._targets(send, direct)
            if len(targets) <= 1:
                for target in targets:
                    deliver(*target)
            else:
                with futures.ThreadPoolExecutor(
                        max_workers=min(len(targets), MAX_PARALLEL_HOSTS),
                        thread_name_prefix=f"send-{self._worker.island}.{self._worker.host}-to"
                ) as pool:
                    calls = [pool.submit(deliver, *target) for target in targets]
                for call in calls:
                    if call.exception() is not None and failure is None:
                        failure = call.exception()
        except Exception as exc:
            failure = exc
        try:
            if failure is not None:
                self._fail_destination(send, failure, delivered)
        finally:
            sender.close(failure is None)
            if isinstance(value, jax.Array):
                self.pins.unpin(value)

    def _targets(self, send: pb.SendInstruction, direct: tuple[copy_plan.Shares, int] | None
                 ) -> list[tuple[int, str, list, tuple[int, int]]]:
        """The destination hosts this host sends to: (host, address, its (index, mesh positions)
        shards, (parts, put) of the put they are part of, or (0, 0): all of it)."""
        info = send.destination_slice
        if direct is not None:
            shares, put = direct
            return [(host, info.host_addresses[host], senders[self._worker.host],
                     (len(senders), put))
                    for host, senders in sorted(shares.items()) if self._worker.host in senders]
        return [(host, address, mine, (0, 0)) for host, address, mine in
                copy_plan.whole_shares(send.destination.shape, info, send.destination.sharding)]

    def _fail_destination(self, send: pb.SendInstruction, cause: Exception,
                          delivered: set[int]) -> None:
        """Fails the copy on every destination host not yet `delivered`: readers get an
        ExecutionError naming the source and `cause` at once, instead of waiting for data that
        will not come. A host that cannot be told is lost: the controller reports it."""
        dest, info = send.destination, send.destination_slice
        if isinstance(cause, grpc.RpcError):
            reason = f"{cause.code().name}: {cause.details()}"
        else:
            reason = str(cause) or type(cause).__name__
        message = (f"transfer of array {send.array_id} from host {self._worker.island}.{self._worker.host} to "
                   f"array {dest.array_id} on slice {dest.sharding.slice_id} failed: {reason}")
        log.warning("%s", message)
        for host, address in enumerate(info.host_addresses):
            if host in delivered or not any(d.host == host for d in info.devices):
                continue
            if address == self._worker.address:
                self._worker.store.fail(dest.array_id, ExecutionError(message), only_pending=True)
                continue
            try:
                self._peer(address).PutArray(iter([pb.ArrayChunk(spec=dest, error=message)]),
                                             timeout=SLICE_TIMEOUT_S)
            except grpc.RpcError as err:
                log.warning("could not tell host %s that %s: %s", address, message,
                            err.code().name)

    def _peer(self, address: str) -> pb_grpc.WorkerStub:
        with self._lock:
            stub = self._peers.get(address)
            if stub is None:
                channel = _rpc.open_channel(address, self._worker.credentials)
                stub = self._peers[address] = FramedWorkerStub(channel)
            return stub

    def stop(self, wait_s: float) -> None:
        """Cancels queued sends and waits (at most `wait_s`) for those streaming: threads still
        inside gRPC or XLA when the interpreter exits can abort the process, and every call of
        theirs has a deadline."""
        self.early.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + wait_s
        for thread in list(getattr(self._pool, "_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))


def _held_by(value: jax.Array, devices: Sequence[jax.Device]
             ) -> Callable[[], np.ndarray] | None:
    """When the shards on `devices` make up the whole of `value`: a function assembling it (to
    call where those devices are local); else None. Decided from the sharding alone, so every
    host of the slice decides alike."""
    wanted = set(devices)
    parts: dict[tuple, jax.Device] = {}
    for device, index in value.sharding.devices_indices_map(value.shape).items():
        if device in wanted:
            bounds = tuple(part.indices(size)[:2] for part, size in zip(index, value.shape))
            parts.setdefault(bounds, device)
    covered = sum(math.prod(b - a for a, b in bounds) for bounds in parts)
    if covered != math.prod(value.shape):  # disjoint shards: covering is adding up
        return None

    def assemble() -> np.ndarray:
        local = {device: data for _, device, data in _wire.addressable_blocks(value)}
        whole = np.empty(value.shape, value.dtype)
        for bounds, device in parts.items():
            whole[tuple(slice(a, b) for a, b in bounds)] = np.asarray(local[device])
        return whole
    return assemble


@functools.lru_cache(maxsize=64)
def _replicator(sharding: NamedSharding) -> Callable[[jax.Array], jax.Array]:
    """A compiled identity whose output is laid out as `sharding` (one per sharding)."""
    return jax.jit(lambda v: v, out_shardings=sharding)
