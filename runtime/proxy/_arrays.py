"""The arrays a JAX client holds handles to, and how each lives in the runtime.

An IFRT array is a runtime array (a RemoteArray on a slice whose mesh and spec place every block
where the IFRT sharding says, runtime.proxy._shardings), or a block of one (a single-device array
from a disassembly: read from, or copied off, its parent's host only when used), or an error
(every use raises it). Data moves as the client API moves it: puts stream to the hosts, reads
stream back, copies between slices and islands go host to host.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent import futures
from typing import TYPE_CHECKING

import numpy as np

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.config import ProxyConfig, from_env
from proto.errors import ArrayNotFoundError, DeadlineExceededError, PathwaysError
from runtime.client.array import (RemoteArray, _host_groups, _worker_call, fetch_arrays,
                                  transfer_deadline)
from runtime.client.client import VirtualSlice
from runtime.proxy._shardings import Index, Layout, Placement, place

if TYPE_CHECKING:
    from runtime.proxy._session import Session

#: Longest a read or a ready check waits for an array to be computed.
READ_TIMEOUT_S = from_env(ProxyConfig).proxy_read_timeout_s


@dataclasses.dataclass(eq=False)
class ProxyArray:
    """What one IFRT array handle stands for (see the module docstring)."""

    dtype: np.dtype | None
    shape: tuple[int, ...]
    layout: Layout | None
    remote: RemoteArray | None = None
    block_of: tuple[RemoteArray, Index] | None = None  # parent array and the block this is
    error: PathwaysError | None = None
    deleted: bool = False

    @classmethod
    def failed(cls, error: PathwaysError) -> ProxyArray:
        return cls(None, (), None, error=error)

    def check(self) -> None:
        """Raises the array's error, or ArrayNotFoundError once it was deleted."""
        if self.error is not None:
            error = type(self.error)(str(self.error))
            error.code = self.error.code  # the instance's own, for errors the client made
            raise error
        if self.deleted or (self.remote is not None and self.remote.is_deleted()):
            raise ArrayNotFoundError("the array was deleted or donated")

    def delete(self) -> None:
        """Drops this handle's hold on the data (freed once nothing else holds it)."""
        self.deleted = True
        self.remote = self.block_of = None


def find(session: Session, handle: int) -> ProxyArray:
    """The live array behind a handle (NOT_FOUND for an unknown one, its error for a failed one)."""
    array = session.arrays.get(handle)
    if array is None:
        raise ArrayNotFoundError(f"array handle {handle} is unknown")
    array.check()
    return array


def slice_for(session: Session, placement: Placement) -> VirtualSlice:
    """The session's slice of a placement (created on first use, on exactly its devices)."""
    with session.slices_lock:
        vslice = session.slices.get(placement.slice_key)
        if vslice is None:
            island = session.devices.island_of(placement.devices, "an array or computation")
            vslice = session.client.slice(placement.mesh_shape, placement.axis_names,
                                          island=island,
                                          devices=session.devices.placement(placement.devices))
            session.slices[placement.slice_key] = vslice
        return vslice


def put(session: Session, value: np.ndarray, layout: Layout) -> RemoteArray:
    """Streams a whole array to the hosts its layout names; returns when they hold it."""
    placement = place([layout], "the array")
    return session.client.put(value, slice_for(session, placement), placement.specs[0])


def remote_of(session: Session, array: ProxyArray) -> RemoteArray:
    """The array as a runtime array: a block of another is first copied onto its own device
    (through the proxy: the runtime moves whole arrays between slices, not blocks)."""
    array.check()
    if array.remote is None:
        value = read(session, array)
        array.remote = put(session, value, array.layout)
        array.block_of = None
    return array.remote


def read(session: Session, array: ProxyArray, timeout: float = READ_TIMEOUT_S) -> np.ndarray:
    """The array's data, once computed (a block is read from its host alone)."""
    array.check()
    if array.block_of is not None:
        parent, index = array.block_of
        return _read_block(session, parent, index, timeout)
    return fetch_arrays(session.client, [array.remote], timeout)[0]


def wait_ready(session: Session, arrays: list[ProxyArray],
               timeout: float = READ_TIMEOUT_S) -> None:
    """Waits until every array is computed on every host holding it; raises the failure of its
    producer (the error a read would raise) without moving its data."""
    remotes = []
    for array in arrays:
        array.check()
        remotes.append(array.remote if array.remote is not None else array.block_of[0])
    deadline = time.monotonic() + timeout
    jobs = []
    pool = session.client.transfer_pool
    for remote in remotes:
        _await_order(remote, deadline)
        hosts = _host_groups(remote.shape, remote.slice,
                             _wire.spec_to_proto(remote.slice.slice_id, remote.spec))
        for host in hosts:
            request = pb.GetArrayRequest(array_id=remote.id, timeout_s=_left(deadline),
                                         after_sequence=remote.sequence, ready_only=True)
            jobs.append(pool.submit(_worker_call, session.client, remote.slice, host,
                                    lambda stub, r=request: list(stub.GetArray(
                                        r, timeout=r.timeout_s + 5))))
    for job in futures.as_completed(jobs, timeout=_left(deadline) + 10):
        job.result()


def _read_block(session: Session, parent: RemoteArray, index: Index,
                timeout: float) -> np.ndarray:
    """One block of an array, from a host that holds it."""
    deadline = time.monotonic() + timeout
    _await_order(parent, deadline)
    sharding = _wire.spec_to_proto(parent.slice.slice_id, parent.spec)
    host = next(h for h, groups in _host_groups(parent.shape, parent.slice, sharding).items()
                if any(i == index for i, _ in groups))
    request = pb.GetArrayRequest(array_id=parent.id, timeout_s=_left(deadline),
                                 after_sequence=parent.sequence,
                                 shards=[_wire.index_to_proto(index)])
    nbytes = int(np.prod(_wire.shard_shape(index), dtype=np.int64)) * parent.dtype.itemsize

    def receive(stub):
        chunks = stub.GetArray(request, timeout=request.timeout_s
                                + transfer_deadline(nbytes, session.client.config))
        _, shards = _wire.assemble_chunks(chunks, parent.dtype)
        return shards[0].data
    return _worker_call(session.client, parent.slice, host, receive)


def _await_order(remote: RemoteArray, deadline: float) -> None:
    """Waits for the controller to order the command making `remote` (its rejection raises)."""
    ticket = remote._ticket
    if ticket is not None:
        ticket.wait(_left(deadline))
        remote._ticket = None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("the array was not computed in time")
    return left
