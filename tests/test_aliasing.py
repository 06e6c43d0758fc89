"""Copies never share buffers with their source, and a send captures its source in island order.

Donation frees (or overwrites) an input's buffers: if a copy aliased its source, donating the copy
would destroy the original; if a send read its source after a later donating call, it would send
garbage or nothing. These run on the shared in-process cluster (tests/conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb


def _bump(client, s, spec):
    return client.jit(lambda v: v + 1, s, in_specs=spec, out_specs=spec, donate_argnums=0)


def test_donating_a_copy_on_the_same_slice_keeps_the_original(client):
    s = client.slice({"d": 4}, island=0)
    x = client.put(np.arange(8, dtype=np.float32), s, P("d"))
    copy = x.to(s)
    np.testing.assert_array_equal(_bump(client, s, P("d"))(copy).fetch(), np.arange(8) + 1)
    np.testing.assert_array_equal(x.fetch(), np.arange(8))


def test_donating_a_copy_on_another_slice_over_the_same_devices_keeps_the_original(client):
    s, twin = client.slice({"d": 4}, island=0), client.slice({"d": 4}, island=0)
    assert list(s.info.devices) == list(twin.info.devices)
    x = client.put(np.arange(8, dtype=np.int32), s, P("d"))
    out = _bump(client, twin, P("d"))(x.to(twin))
    np.testing.assert_array_equal(out.fetch(), np.arange(8) + 1)
    np.testing.assert_array_equal(x.fetch(), np.arange(8))


@pytest.mark.parametrize("spec, want", [(P("d"), P("d")), (P("one"), P()), (P(), P("one"))])
def test_implicit_reshard_of_a_donated_argument_keeps_the_original(client, spec, want):
    """A donated argument on another slice or with another spec is copied first; the call donates
    the copy, never the caller's array (even where the layouts coincide device for device)."""
    s = client.slice({"one": 1, "d": 4}, island=1)
    twin = client.slice({"one": 1, "d": 4}, island=1)
    x = client.put(np.arange(8, dtype=np.float32).reshape(4, 2), s, spec)
    f = client.jit(lambda v: v * 2, twin, in_specs=want, out_specs=want, donate_argnums=0)
    np.testing.assert_array_equal(f(x).fetch(), np.arange(8).reshape(4, 2) * 2)
    assert not x.is_deleted()
    np.testing.assert_array_equal(x.fetch(), np.arange(8).reshape(4, 2))


def test_transfer_ordered_before_a_donating_call_sends_the_value_before_it(client):
    """The island's order is the semantics: a transfer queued behind busy senders still sends what
    its source held at its place in the order, although a later call donates that source."""
    s0, s1 = client.slice({"d": 4}, island=0), client.slice({"d": 4}, island=1)
    slow = client.jit(lambda v: jax.lax.fori_loop(0, 40, lambda i, a: jnp.tanh(a @ a) + 0.5, v), s0)
    bump = client.jit(lambda v: v + 1, s0, donate_argnums=0)
    x = client.put(np.eye(256, dtype=np.float32) * 0.01, s0)
    want = np.asarray(slow(x).fetch())
    busy = [client.put(np.full(1 << 22, i, np.float32), s0, P("d")) for i in range(8)]
    y = slow(x)
    copies = [b.to(s1) for b in busy] + [y.to(s1)]
    z = bump(y)
    np.testing.assert_array_equal(copies[-1].fetch(timeout=60), want)
    np.testing.assert_array_equal(z.fetch(), want + 1)
    for i, c in enumerate(copies[:-1]):
        assert c.fetch()[-1] == i


def test_transfer_then_delete_still_sends(client):
    s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
    x = client.put(np.arange(1 << 20, dtype=np.float32), s0, P("d"))
    copy = x.to(s1, P())
    x.delete()
    np.testing.assert_array_equal(copy.fetch(), np.arange(1 << 20, dtype=np.float32))


def test_failed_send_fails_its_destination_at_once_naming_source_and_cause(cluster, client):
    """A send whose source cannot be read while streaming tells the destination host, whose
    readers get an ExecutionError naming the source and the cause (not a wait to the deadline)."""
    s1 = client.slice({"d": 2}, island=1)
    sender, receiver = cluster.workers[0], cluster.workers[1]
    dest = client.new_handle((4,), np.float32, P("d"), s1)
    spec = pb.ArraySpec(array_id=dest.id, dtype="float32", shape=[4],
                        sharding=pb.Sharding(slice_id=s1.slice_id, dims=[pb.DimSharding(axes=["d"])]))
    receiver.store.expect(dest.id)
    with receiver._cond:  # as the controller's Expect instruction announces it
        receiver.announcements.announce([spec])
    doomed = jax.device_put(np.zeros(4, np.float32), sender.devices[0])
    doomed.delete()
    send = pb.SendInstruction(array_id=4242, destination=spec, destination_slice=s1.info)
    sender._transfers._stream(doomed, send)
    with pytest.raises(runtime.ExecutionError, match=r"array 4242 from host 0\.0 .*deleted"):
        receiver.store.get(dest.id, timeout=0.0)
    receiver.store.delete(dest.id)
    dest._mark_consumed()


def test_reading_freed_buffers_is_a_runtime_error_not_unknown(cluster, client):
    s = client.slice({"d": 2}, island=0)
    x = client.put(np.arange(4, dtype=np.float32), s, P("d"))
    client.sync()
    cluster.workers[0].store.get(x.id, 5.0).delete()  # buffers gone under the store
    with pytest.raises(runtime.ArrayNotFoundError, match="freed"):
        x.fetch()


def test_a_donation_spares_buffers_a_pending_send_holds():
    from runtime.worker.pins import SendPins

    pins = SendPins()
    held = jax.device_put(np.arange(4.0), jax.devices()[0])
    other = jax.device_put(np.arange(4.0), jax.devices()[0])
    pins.pin(held)
    inputs = [held, other]
    pins.spare_donated(inputs, (0, 1))
    assert inputs[0] is not held and inputs[1] is other
    np.testing.assert_array_equal(np.asarray(inputs[0]), np.arange(4.0))
    pins.unpin(held)
    assert not pins.holds(held) and len(pins) == 0
