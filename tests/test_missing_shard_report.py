"""A read of a shard the host's stored array does not hold names what the host holds: the stored
array's sharding (spec, mesh shape, mesh devices), each shard's device and block, and what stored
it (a put, an execution's output, a copy), so that such a failure seen once says where the layout
went wrong."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import NotFoundError
from runtime.worker.announced import Announcements
from runtime.worker.dataplane import DataPlane
from runtime.worker.store import ArrayStore, describe_layout


def _plane(store: ArrayStore) -> DataPlane:
    return DataPlane(0, 0, cond=threading.Condition(), store=store,
                     announcements=Announcements(store), mesh=lambda *_: None,
                     wait_received=lambda *_: None)


def test_a_missing_shard_is_reported_with_the_stored_layout_and_its_origin():
    devices = jax.devices()[:2]
    mesh = Mesh(np.array(devices), ("x",))
    value = jax.device_put(np.arange(8, dtype=np.float32), NamedSharding(mesh, P()))
    store = ArrayStore()
    store.set(7, value, origin=("a put on slice {}", 3))
    request = pb.GetArrayRequest(array_id=7, timeout_s=1.0,
                                 shards=[_wire.index_to_proto(((4, 8),))])
    with pytest.raises(NotFoundError) as info:
        list(_plane(store).get(request))
    message = str(info.value)
    ids = [d.id for d in devices]
    assert "shard ((4, 8),) is not on this host (it holds [((0, 8),)] of float32[8]" in message
    assert "stored by a put on slice 3" in message
    assert f"over mesh {{'x': 2}} of devices {ids}" in message
    assert f"shards by device {{{ids[0]}: ((0, 8),), {ids[1]}: ((0, 8),)}}" in message


def test_the_layout_names_each_device_and_its_block_and_the_origin_is_formatted_once_read():
    devices = jax.devices()[:4]
    mesh = Mesh(np.array(devices).reshape(2, 2), ("d0", "d1"))
    value = jax.device_put(np.zeros((8, 8), np.float32), NamedSharding(mesh, P("d0")))
    text = describe_layout(value)
    assert "P('d0',) over mesh {'d0': 2, 'd1': 2}" in text
    blocks = {d.id: ((0, 4), (0, 8)) if i < 2 else ((4, 8), (0, 8)) for i, d in enumerate(devices)}
    for device, block in blocks.items():
        assert f"{device}: {block}" in text
    store = ArrayStore()
    store.set(9, value, origin=("output {} of {} (executable {}, #{})", 1, "f", 5, 12))
    assert store.origin(9) == "output 1 of f (executable 5, #12)"
    store.fail(9, NotFoundError("gone"))
    assert store.origin(9) == "" and store.origin(10) == ""


class _LazyShards:
    """A stored array whose shard list, like jaxlib's (built lazily, not thread-safe: two threads
    building it at once got a list short or doubled), must not be listed by two threads at once.
    Each lister waits (up to 1 s) for a second one to come in, and records it if one does."""

    shape = (8,)
    dtype = np.dtype(np.float32)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._second = threading.Event()
        self.overlapped = False

    @property
    def addressable_shards(self):
        with self._lock:
            self._inside += 1
            if self._inside > 1:
                self.overlapped = True
                self._second.set()
        self._second.wait(1.0)
        with self._lock:
            self._inside -= 1
        return [SimpleNamespace(index=(slice(start, start + 4),), device=SimpleNamespace(id=i),
                                data=np.full(4, i, np.float32))
                for i, start in enumerate((0, 4))]


def test_concurrent_reads_of_two_shards_list_the_stored_array_one_at_a_time():
    """What the conformance test's plain-JAX reads do: one read per distinct shard, at once."""
    store = ArrayStore()
    value = _LazyShards()
    store.set(11, value, nbytes=32)
    plane = _plane(store)
    start = threading.Barrier(2)
    got, errors = {}, []

    def read(block):
        start.wait()
        try:
            request = pb.GetArrayRequest(array_id=11, timeout_s=5.0,
                                         shards=[_wire.index_to_proto(block)])
            got[block] = list(plane.get(request))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(b,)) for b in (((0, 4),), ((4, 8),))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors and set(got) == {((0, 4),), ((4, 8),)}
    assert not value.overlapped, "two reads listed the array's shards at the same time"
