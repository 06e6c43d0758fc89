"""A host whose process restarted without the controller noticing registers again holding none of
its island's order: the controller cannot replay what it lacks (it keeps only the slices and
loads), so instead of leaving the host waiting for ever for the missing sequence numbers, it
declares the host lost with that reason and restarts the island, which then takes new work."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb
from proto.errors import HostLostError, NotFoundError


def slice_with_work(client, calls):
    """A slice of the island's two devices and `calls` calls on it, done: (function, value)."""
    s = client.slice({"d": 2})
    x = client.put(np.ones(2, np.float32), s, P("d"))
    f = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
    for _ in range(calls):
        x = f(x)
    np.testing.assert_array_equal(x.fetch(timeout=60), 1 + calls)
    client.sync()
    return f, x


def test_a_host_whose_process_restarted_unnoticed_restarts_its_island_with_a_clear_error():
    with runtime.LocalCluster(islands=1, devices_per_island=2) as cluster:
        controller = cluster.controller
        with cluster.client() as client:
            f, x = slice_with_work(client, 5)
            old = controller._schedulers[0]
            assert old._links[0].acked > 0
            # The host's new process registers: the same place, none of the order.
            info = cluster.workers[0].info()
            info.received = info.executed = 0
            info.incarnation = "a new process"
            controller.health.register_host(info)
            failure = old.failure
            assert isinstance(failure, HostLostError)
            assert "its process restarted" in str(failure) and "island restarts" in str(failure)
            assert controller._schedulers[0] is not old  # a fresh order, a new epoch
            # The restarted island holds neither slice nor executables nor arrays; what the
            # client still holds is refused, saying why it is gone.
            with pytest.raises(NotFoundError, match=r"island 0 restarted \(epoch 1\) after "
                                                    r"host 0\.0 .* was lost, which dropped it "
                                                    r"\(compile the function again\)"):
                f(x).fetch(timeout=30)
            with pytest.raises(NotFoundError, match=r"slice \d+ is unknown: island 0 restarted "
                                                    r".*\(make a new slice\)"):
                client.put(np.ones(2, np.float32), f.vslice, P("d")).fetch(timeout=30)
            s2 = client.slice({"d": 2})  # and it takes new work
            y = client.put(np.ones(2, np.float32), s2, P("d"))
            g = client.jit(lambda v: v * 3, s2, in_specs=P("d"), out_specs=P("d"))
            np.testing.assert_array_equal(g(y).fetch(timeout=60), 3)


def test_a_live_host_that_registers_again_keeps_its_island():
    with runtime.LocalCluster(islands=1, devices_per_island=2) as cluster:
        controller = cluster.controller
        with cluster.client() as client:
            f, x = slice_with_work(client, 1)
            old = controller._schedulers[0]
            info = cluster.workers[0].info()
            info.received = 0  # a report older than its acknowledgements: the same process
            controller.health.register_host(info)
            assert controller._schedulers[0] is old and old.failure is None
            np.testing.assert_array_equal(f(x).fetch(timeout=60), 3)
