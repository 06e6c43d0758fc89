"""Warm memory for array bytes: host buffers come back for reuse only once nothing views them
(not even a device buffer aliasing them), client segments keep their mapping between transfers,
and a host keeps a peer's segment mapped only while the peer holds it."""

from __future__ import annotations

import gc
import mmap
import threading
import time

import jax
import numpy as np
import pytest

from proto import buffers as _buffers
from proto import shm as _shm

MIB = 1 << 20


def _wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return condition()


def test_a_host_buffer_returns_only_when_its_last_view_is_gone():
    pool = _buffers.BufferPool(max_idle_bytes=8 * MIB, min_bytes=MIB)
    first = pool.empty((MIB // 4,), np.float32)
    assert first.ctypes.data % _buffers.DEVICE_ALIGNMENT == 0
    address = first.ctypes.data
    view = first[10:]
    del first
    gc.collect()
    assert pool.idle_bytes == 0  # a view still holds it
    other = pool.empty((MIB // 4,), np.float32)
    addresses = {address, other.ctypes.data}
    assert len(addresses) == 2  # not handed out twice
    del view, other
    assert _wait_for(lambda: pool.idle_bytes == 2 * MIB)
    again = pool.empty((2, MIB // 8), np.float32)
    assert again.ctypes.data in addresses and pool.idle_bytes == MIB
    small = pool.empty((16,), np.float32)  # under min_bytes: plain memory
    del small
    assert pool.idle_bytes == MIB


def test_a_host_buffer_aliased_by_a_device_comes_back_when_the_device_buffer_is_freed():
    pool = _buffers.BufferPool(max_idle_bytes=8 * MIB, min_bytes=MIB)
    data = pool.empty((MIB // 4,), np.float32)
    data[:] = np.arange(MIB // 4, dtype=np.float32)
    data.flags.writeable = False
    address = data.ctypes.data
    on_device = jax.device_put(data, jax.devices()[0])
    aliased = on_device.unsafe_buffer_pointer() == address
    del data
    gc.collect()
    if aliased:  # JAX's CPU client took the memory over rather than copying it
        assert pool.idle_bytes == 0
        assert float(on_device[-1]) == MIB // 4 - 1
    del on_device
    assert _wait_for(lambda: pool.idle_bytes == MIB)


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not hasattr(mmap, "MAP_POPULATE"), reason="MAP_POPULATE is Linux's")
def test_a_fresh_pool_buffer_has_its_pages_in_place_before_the_first_copy():
    """The kernel faults a new buffer's pages in at allocation (one call), not the first copy
    into it (a trap per page): the process's resident memory grows by the buffer before it is
    written; np.empty's does not."""
    nbytes = 64 * MIB
    before = _resident_bytes()
    plain = np.empty(nbytes, np.uint8)
    assert _resident_bytes() - before < nbytes // 2
    del plain
    before = _resident_bytes()
    pool = _buffers.BufferPool(max_idle_bytes=nbytes, min_bytes=MIB)
    fresh = pool.empty((nbytes // 4,), np.float32)
    assert _resident_bytes() - before >= nbytes * 0.9
    assert fresh.ctypes.data % mmap.PAGESIZE == 0 and fresh.flags.writeable
    fresh[:] = 1.5
    fresh.flags.writeable = False
    on_device = jax.device_put(fresh, jax.devices()[0])  # aliased or copied, the same values
    np.testing.assert_array_equal(np.asarray(on_device), np.full(nbytes // 4, 1.5, np.float32))


def test_the_full_pool_lets_buffers_go():
    pool = _buffers.BufferPool(max_idle_bytes=MIB, min_bytes=MIB)
    a, b = pool.empty((MIB,), np.uint8), pool.empty((MIB,), np.uint8)
    del a, b
    assert _wait_for(lambda: pool.idle_bytes == MIB)
    pool.clear()
    assert pool.idle_bytes == 0


def test_a_segment_from_the_pool_is_the_same_mapping_and_waits_for_its_views():
    pool = _shm.SegmentPool(max_bytes=4 * MIB)
    segment = pool.take(MIB)
    view = segment.array(np.dtype(np.uint8), (MIB,))
    view[:] = 7
    address = view.ctypes.data
    segment.release_with_views()
    assert pool.take(MIB).reference != segment.reference  # still viewed: not reused yet
    del view
    assert _wait_for(lambda: pool._free.get(MIB))
    again = pool.take(MIB)
    assert again.reference == segment.reference
    again_view = again.array(np.dtype(np.uint8), (MIB,))
    assert again_view.ctypes.data == address and again_view[0] == 7  # mapped once, kept
    del again_view
    again.release()
    assert pool._free.get(MIB)
    pool.clear()


def test_a_peer_segment_stays_mapped_while_its_peer_holds_it():
    peers = _shm._PeerMappings(max_bytes=4 * MIB, check_s=0.05)
    pool = _shm.SegmentPool(max_bytes=0)
    segment = pool.take(MIB)
    try:
        first = peers.get(segment.reference, MIB, False)
        assert peers.get(segment.reference, MIB, False) is first  # not mapped again
        assert peers.get(segment.reference, MIB, True) is not first  # writable: its own
    finally:
        segment.discard()  # the peer lets its file go: so does the cache
    assert _wait_for(lambda: not peers._maps, 10)
    assert first.closed


def test_peer_mappings_beyond_the_bound_are_dropped_oldest_first():
    peers = _shm._PeerMappings(max_bytes=2 * MIB, check_s=60)
    pool = _shm.SegmentPool(max_bytes=0)
    segments = [pool.take(MIB) for _ in range(3)]
    try:
        maps = [peers.get(s.reference, MIB, False) for s in segments]
        assert maps[0].closed and not maps[1].closed and not maps[2].closed
        assert peers._bytes == 2 * MIB
    finally:
        peers.clear()
        for s in segments:
            s.discard()


def test_buffers_are_carved_from_the_reserve_before_any_is_made_afresh():
    pool = _buffers.BufferPool(max_idle_bytes=1, min_bytes=MIB)  # keeps no fresh buffer idle
    pool.reserve(4 * MIB + 100)
    assert pool.reserved_bytes == 4 * MIB + 100
    first = pool.empty((MIB // 4,), np.float32)
    second = pool.empty((MIB + 8,), np.uint8)
    assert first.ctypes.data % mmap.PAGESIZE == 0 and second.ctypes.data % mmap.PAGESIZE == 0
    assert second.ctypes.data == first.ctypes.data + MIB  # carved one after the other
    left = 4 * MIB + 100 - MIB - (-(-(MIB + 8) // mmap.PAGESIZE) * mmap.PAGESIZE)
    assert pool.reserved_bytes == left
    address = first.ctypes.data
    del first
    # Back for reuse whatever max_idle_bytes (its memory is held anyway), not counted as idle.
    assert _wait_for(lambda: pool.empty((MIB,), np.uint8).ctypes.data == address)
    assert pool.idle_bytes == 0
    big = pool.empty((8 * MIB,), np.uint8)  # more than is left: made afresh
    assert pool.reserved_bytes == left and big.nbytes == 8 * MIB
    pool.clear()
    assert pool.reserved_bytes == 0


def test_a_buffer_waits_for_a_reserve_being_made_rather_than_fault_in_its_own(monkeypatch):
    pool = _buffers.BufferPool(max_idle_bytes=8 * MIB, min_bytes=MIB)
    release = threading.Event()
    real = _buffers.populated_empty

    def slow(nbytes):
        release.wait(30)
        return real(nbytes)

    monkeypatch.setattr(_buffers, "populated_empty", slow)
    maker = threading.Thread(target=pool.reserve, args=(4 * MIB,))
    maker.start()
    assert _wait_for(lambda: pool._reserving == 4 * MIB)
    got = []
    taker = threading.Thread(target=lambda: got.append(pool.empty((MIB,), np.uint8)))
    taker.start()
    time.sleep(0.2)
    assert not got  # waiting for the reserve
    release.set()
    maker.join(30)
    taker.join(30)
    assert got and pool.reserved_bytes == 3 * MIB  # carved from it


def test_a_process_reserves_once(monkeypatch):
    pool = _buffers.BufferPool(max_idle_bytes=8 * MIB)
    monkeypatch.setattr(_shm, "HOST_BUFFERS", pool)
    monkeypatch.setattr(_shm, "_reserved", False)
    _shm.reserve_memory(0)  # nothing asked: nothing reserved, and a later call still may
    assert pool.reserved_bytes == 0
    _shm.reserve_memory(2 * MIB)
    _shm.reserve_memory(2 * MIB)  # a second client or host of the process
    assert pool.reserved_bytes == 2 * MIB
