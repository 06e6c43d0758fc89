"""Remote arrays: client-side handles to logical arrays living on an island, and their data plane.

Array data never passes through the controller: a put streams each distinct shard straight to the
hosts whose devices hold it, and a fetch streams shards back from those hosts, in parallel.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from proto import pathways_pb2 as pb
from proto import transfer as _transfer
from proto import wire as _wire
from proto.config import ClientConfig, from_env
from proto.errors import (ArrayNotFoundError, DeadlineExceededError, HostLostError,
                          InvalidArgumentError, translate_rpc_error)
from runtime.client import avals as _avals

if TYPE_CHECKING:
    from runtime.client.client import Client, VirtualSlice

#: Transfer deadlines, unless a client's config says otherwise: a floor plus time for the bytes
#: at a pessimistic rate.
TRANSFER_FLOOR_S = from_env(ClientConfig).transfer_floor_s
TRANSFER_BYTES_PER_S = from_env(ClientConfig).transfer_bytes_per_s


def transfer_deadline(nbytes: int, config: ClientConfig | None = None) -> float:
    """The deadline of moving `nbytes`: `config`'s floor plus the bytes at its slowest rate
    (without a config, this process's defaults)."""
    if config is None:
        return TRANSFER_FLOOR_S + nbytes / TRANSFER_BYTES_PER_S
    return config.transfer_floor_s + nbytes / config.transfer_bytes_per_s


def _wait_jobs(jobs, timeout: float, what: str) -> None:
    """Waits for transfer jobs with a deadline of its own (the RPCs carry theirs too; this one
    holds even if a stream stalls), re-raising the first failure."""
    try:
        for job in futures.as_completed(jobs, timeout=timeout):
            if job.exception() is not None:
                break  # fail fast; its error is raised below
    except futures.TimeoutError:  # only as_completed's own deadline lands here
        for job in jobs:
            job.cancel()
        raise DeadlineExceededError(f"{what} did not finish within {timeout:.0f} s") from None
    for job in jobs:
        if job.done() and job.exception() is not None:
            raise job.exception()


class RemoteArray:
    """A handle to a logical array on a virtual slice; its shape, dtype and sharding are static.

    Handles exist before the array's producer has run, even before the controller has ordered it.
    Reading (`fetch`, `np.asarray`) waits for it. An array is freed on its hosts when `delete()` is
    called or the last handle is dropped, after every command already submitted that reads it.
    Handles with a negative id are placeholders inside a program trace.
    """

    __slots__ = ("_client", "id", "shape", "dtype", "weak_type", "data_shape", "data_dtype",
                 "spec", "slice", "sequence", "_ticket", "_deleted", "__weakref__")

    def __init__(self, client: Client, array_id: int, shape: Sequence[int], dtype,
                 spec: PartitionSpec, vslice: VirtualSlice, sequence: int = 0, *,
                 weak_type: bool = False) -> None:
        self._client = client
        self.id = array_id
        self.shape = tuple(int(d) for d in shape)
        self.dtype = _avals.logical_dtype(dtype)  # a NumPy dtype, or a typed key's dtype
        self.weak_type = bool(weak_type)  # as jax.Array.weak_type (Python scalars and their kin)
        # What the hosts hold: the array, or a typed key's uint32 key data (runtime.client.avals).
        self.data_shape, self.data_dtype = _avals.data_layout(self.shape, self.dtype)
        self.spec = spec
        self.slice = vslice
        self.sequence = sequence  # the island instruction that creates it (0: not yet ordered)
        self._ticket = None  # the command that creates it, while the controller has not answered
        self._deleted = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.data_shape) * self.data_dtype.itemsize

    @property
    def sharding(self) -> NamedSharding:
        """The array's NamedSharding on its slice's abstract mesh."""
        return NamedSharding(self.slice.mesh, self.spec)

    @property
    def aval(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype, weak_type=self.weak_type)

    def is_deleted(self) -> bool:
        return self._deleted

    def check_alive(self) -> None:
        if self._deleted:
            raise ArrayNotFoundError(f"array {self.id} was deleted or donated")

    def to(self, vslice: VirtualSlice, spec: PartitionSpec | None = None) -> RemoteArray:
        """A copy on another slice (any island) with sharding `spec` (default: this one's).

        Returns at once; the hosts move the data between themselves, after this array's producer.
        """
        return self._client.transfer(self, vslice, self.spec if spec is None else spec)

    def fetch(self, timeout: float | None = None) -> np.ndarray:
        """Copies the array to a NumPy array, waiting for its producer (up to `timeout` s). A typed
        PRNG key array comes back as a JAX key array (NumPy cannot hold keys).

        Raises ArrayNotFoundError if deleted, ExecutionError if its producer failed,
        DeadlineExceededError if it is not ready in time, HostLostError if a host is gone.
        """
        self.check_alive()
        return fetch_arrays(self._client, [self], timeout)[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = self.fetch()
        return value if dtype is None else value.astype(dtype)

    def delete(self) -> None:
        """Frees the array on its hosts once every command already submitted that reads it has
        run. Returns at once."""
        self.check_alive()
        self._deleted = True
        self._client.commands.drop(self.id, wake=True)

    def _mark_consumed(self) -> None:
        """The array was donated to a call: the handle is dead, the controller already knows."""
        self._deleted = True

    def __del__(self) -> None:
        if not self._deleted and self.id > 0:
            self._client.commands.drop(self.id)

    def __repr__(self) -> str:
        state = "deleted" if self._deleted else f"slice {self.slice.slice_id}"
        weak = "~" if self.weak_type else ""
        return (f"RemoteArray(id={self.id}, {weak}{self.dtype}{list(self.shape)}, {self.spec}, "
                f"{state})")


def _host_groups(shape, vslice: VirtualSlice, sharding: pb.Sharding
                 ) -> dict[int, list[tuple[_wire.Index, list[int]]]]:
    """Distinct shards per host: host -> [(index, mesh positions on that host)]."""
    per_host: dict[int, list[tuple[_wire.Index, list[int]]]] = {}
    for index, positions in _wire.shard_groups(shape, vslice.mesh_shape, sharding):
        on_host: dict[int, list[int]] = {}
        for p in positions:
            on_host.setdefault(vslice.info.devices[p].host, []).append(p)
        for host, ps in on_host.items():
            per_host.setdefault(host, []).append((index, ps))
    return per_host


def _worker_call(client: Client, vslice: VirtualSlice, host: int, fn):
    try:
        return fn(client.worker_stub(vslice.info.host_addresses[host]))
    except grpc.RpcError as err:
        where = f"host {vslice.island}.{host} ({vslice.info.host_addresses[host]})"
        raise translate_rpc_error(err, where, "a read or write", HostLostError) from None


def put_arrays(client: Client, values: Sequence[np.ndarray], specs: Sequence[pb.ArraySpec],
               vslices: Sequence[VirtualSlice]) -> None:
    """Streams each array's distinct shards to the hosts holding them; returns when all arrived."""
    jobs = []
    deadline_of = functools.partial(transfer_deadline, config=client.config)
    for value, spec, vslice in zip(values, specs, vslices):
        jobs += _transfer.put_jobs(client, value, spec, vslice,
                                   _host_groups(value.shape, vslice, spec.sharding),
                                   _worker_call, deadline_of)
    total = sum(v.nbytes for v in values)
    _wait_jobs(jobs, deadline_of(total) + client.config.transfer_floor_s, "put")


def fetch_arrays(client: Client, arrays: Sequence[RemoteArray], timeout: float | None = None
                 ) -> list[np.ndarray]:
    """Copies several remote arrays to NumPy: hosts in parallel, each host's arrays one after
    another. A read waits on its host for the array to be computed, holding one of the host's
    server threads meanwhile; one read at a time per host keeps a fetch of many arrays from taking
    every thread, which would starve the very transfers those arrays wait for."""
    wait = client.timeout_s if timeout is None else timeout
    deadline = time.monotonic() + wait
    deadline_of = functools.partial(transfer_deadline, config=client.config)
    outputs = []
    per_host: dict[tuple[int, int], list] = {}
    for array in arrays:
        array.check_alive()
        if array.id <= 0:
            raise InvalidArgumentError("a program's values cannot be fetched while it is traced")
        if array._ticket is not None:
            array._ticket.wait(max(0.0, deadline - time.monotonic()))
            array._ticket = None
        sharding = _wire.spec_to_proto(array.slice.slice_id, array.spec)
        groups_of = _host_groups(array.data_shape, array.slice, sharding)
        addresses = {host: array.slice.info.host_addresses[host] for host in groups_of}
        out = _transfer.FetchTarget(array.data_shape, array.data_dtype, list(addresses.values()),
                                    [index for groups in groups_of.values() for index, _ in groups])
        outputs.append(out)
        for host, groups in groups_of.items():
            indices = [index for index, _ in groups]
            nbytes = sum(math.prod(_wire.shard_shape(i)) for i in indices) * out.value.itemsize
            request = out.request(pb.GetArrayRequest(
                array_id=array.id, timeout_s=wait, after_sequence=array.sequence,
                shards=[_wire.index_to_proto(i) for i in indices]), addresses[host])
            per_host.setdefault((array.slice.island, host), []).append(
                (array.slice, host, request, out, nbytes))

    def receive_all(reads) -> None:
        for vslice, host, request, out, nbytes in reads:
            def receive(stub, request=request, out=out, nbytes=nbytes, host=host, vslice=vslice):
                out.receive(stub, request, vslice.info.host_addresses[host],
                            wait + deadline_of(nbytes))

            _worker_call(client, vslice, host, receive)

    jobs = [client.transfer_pool.submit(receive_all, reads) for reads in per_host.values()]
    total = sum(r[4] for reads in per_host.values() for r in reads)
    succeeded = False
    try:
        _wait_jobs(jobs, wait + deadline_of(total) + client.config.transfer_floor_s, "fetch")
        succeeded = True
    finally:
        for out in outputs:
            out.close(succeeded)
    return [_avals.from_host_value(out.value, array.dtype) for out, array in zip(outputs, arrays)]
