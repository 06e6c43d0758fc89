"""The resource manager: registry of islands, hosts and devices; virtual slices and their placement;
hosts joining and leaving; slices released on disconnect."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from runtime import HostLostError, InvalidArgumentError, NotFoundError, SliceUnavailableError
from scheduler import HostRecord, ResourceManager


def host(island, index, devices=4, *, distributed=0, memory=1 << 30):
    return HostRecord(island, index, f"127.0.0.1:{5000 + 10 * island + index}", "cpu", devices,
                      "cpu", device_memory_bytes=memory, distributed_hosts=distributed)


def registry(*hosts):
    rm = ResourceManager()
    for h in hosts:
        rm.register_host(h)
    return rm


def test_registry_records_platform_devices_and_memory():
    rm = registry(host(0, 0, 4, memory=2 << 30), host(1, 0, 2, memory=1 << 30))
    assert [(h.island, h.host, h.platform, h.num_devices, h.device_memory_bytes)
            for h in rm.hosts()] == [(0, 0, "cpu", 4, 2 << 30), (1, 0, "cpu", 2, 1 << 30)]
    assert rm.island_memory() == {0: 8 << 30, 1: 2 << 30}


def test_slices_spread_over_islands_then_devices():
    rm = registry(host(0, 0, 4), host(1, 0, 4))
    first = rm.allocate(1, (2,), ("x",))
    second = rm.allocate(1, (2,), ("x",))
    assert {first.island, second.island} == {0, 1}  # the emptier island each time
    third = rm.allocate(2, (2,), ("x",), island=first.island)
    assert set(third.devices).isdisjoint(first.devices)  # the least-used devices of the island
    fourth = rm.allocate(2, (4,), ("x",), island=first.island)
    assert fourth.devices == tuple((0, d) for d in range(4))  # row-major, host-contiguous


def test_a_slice_no_island_can_hold_is_a_clear_error():
    rm = registry(host(0, 0, 4), host(1, 0, 2))
    with pytest.raises(SliceUnavailableError, match=r"needs 8 devices.*island 0: 4 devices"):
        rm.allocate(1, (2, 4), ("x", "y"))
    with pytest.raises(SliceUnavailableError, match="island 1 cannot hold it"):
        rm.allocate(1, (4,), ("x",), island=1)
    with pytest.raises(SliceUnavailableError, match="island 7 does not exist"):
        rm.allocate(1, (1,), ("x",), island=7)
    with pytest.raises(InvalidArgumentError):
        rm.allocate(1, (2, 0), ("x", "y"))
    with pytest.raises(InvalidArgumentError):
        rm.allocate(1, (2,), ("x", "y"))


def test_slices_span_hosts_only_on_a_complete_distributed_island():
    # Island 0: two hosts of one distributed system; island 1: two independent hosts (as Ray
    # places them); island 2: a distributed island whose second host has not registered yet.
    rm = registry(host(0, 0, 2, distributed=2), host(0, 1, 2, distributed=2),
                  host(1, 0, 2), host(1, 1, 2), host(2, 0, 2, distributed=2))
    wide = rm.allocate(1, (4,), ("x",))
    assert wide.island == 0 and wide.devices == ((0, 0), (0, 1), (1, 0), (1, 1))
    with pytest.raises(SliceUnavailableError, match=r"island 1: 2 devices \(one host\)"):
        rm.allocate(1, (4,), ("x",), island=1)
    with pytest.raises(SliceUnavailableError, match="1 of its 2 hosts registered"):
        rm.allocate(1, (2,), ("x",), island=2)
    narrow = rm.allocate(1, (2,), ("x",), island=1)
    other = rm.allocate(1, (2,), ("x",), island=1)
    assert {d[0] for d in narrow.devices} != {d[0] for d in other.devices}  # one host each
    rm.register_host(host(2, 1, 2, distributed=2))  # the island completes: now it takes slices
    assert rm.allocate(1, (4,), ("x",), island=2).island == 2


def test_hosts_that_leave_and_join_update_the_registry():
    rm = registry(host(0, 0), host(1, 0))
    s = rm.allocate(1, (4,), ("x",), island=1)
    assert rm.remove_host(1, 0, address="elsewhere:1") is None  # a stale request is ignored
    assert rm.remove_host(1, 0).left
    assert [h.state for h in rm.hosts()] == ["alive", "left"]  # kept while a slice uses it
    assert rm.lost_host(1) is not None
    with pytest.raises(SliceUnavailableError, match="host 1.0 .* left"):
        rm.allocate(2, (1,), ("x",), island=1)
    assert rm.allocate(2, (4,), ("x",)).island == 0  # new slices go elsewhere
    rm.release(s.slice_id)
    assert [(h.island, h.host) for h in rm.hosts()] == [(0, 0)]  # forgotten once unused
    assert rm.lost_host(1) is None
    rm.register_host(host(1, 0))  # a host joins (again)
    assert rm.allocate(3, (4,), ("x",), island=1).island == 1
    with pytest.raises(NotFoundError):
        rm.release(s.slice_id)


def test_lost_host_blocks_new_slices_until_it_registers_again():
    rm = registry(host(0, 0), host(0, 1), host(0, 2), host(1, 0))
    assert rm.lost_host(0) is None
    rm.mark_lost(0, 2, "no heartbeat")
    rm.mark_lost(0, 1, "no heartbeat")
    assert rm.hosts()[1].state == "lost: no heartbeat"
    assert rm.lost_host(0).host == 1 and rm.lost_host(1) is None  # the lowest-numbered
    with pytest.raises(SliceUnavailableError, match="lost"):
        rm.allocate(1, (1,), ("x",), island=0)
    rm.register_host(host(0, 1))
    rm.register_host(host(0, 2))
    assert rm.lost_host(0) is None
    assert rm.allocate(1, (1,), ("x",), island=0).island == 0


def test_disconnect_releases_slices_and_arrays(cluster):
    client = cluster.client()
    s = client.slice({"d": 2}, island=0)
    x = client.put(np.arange(4, dtype=np.float32), s, P("d"))
    np.testing.assert_array_equal(x.fetch(), np.arange(4))
    held = {r.slice_id for r in cluster.controller.resources.slices()}
    assert s.slice_id in held
    client.close()
    assert s.slice_id not in {r.slice_id for r in cluster.controller.resources.slices()}
    assert x.id not in cluster.controller.planner.arrays


def test_status_reports_memory_queue_and_activity(cluster, client):
    s = client.slice({"d": 4}, island=1)
    f = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
    f(client.put(np.zeros(8, np.float32), s, P("d"))).fetch()
    status = client.status()
    hosts = {(h.island, h.host): h for h in status.hosts}
    assert hosts[(1, 0)].device_memory_bytes > 0
    assert hosts[(1, 0)].activity == "idle" and hosts[(1, 0)].executed > 0
    island = next(i for i in status.islands if i.island == 1)
    assert island.policy == "fifo" and island.sequence >= hosts[(1, 0)].executed
    assert any(t.session_id == client.session_id and t.ordered >= 1 for t in island.tenants)


def test_a_leaving_host_fails_queued_work_and_takes_no_new_slices():
    with runtime.LocalCluster(islands=2, devices_per_island=2, heartbeat=False) as local:
        client = local.client()
        s = client.slice({"d": 2}, island=1)
        x = client.put(np.ones(2, np.float32), s, P("d"))
        worker = local.workers[1]
        local.controller.health.unregister_host(1, 0, worker.address)
        assert [h.state for h in local.controller.resources.hosts()] == ["alive", "left"]
        with pytest.raises(HostLostError, match="left"):
            client.jit(lambda v: v * 2, s, in_specs=P("d"), out_specs=P("d"))(x).fetch()
        with pytest.raises(HostLostError, match="left"):
            client.slice({"d": 2}, island=1)
        assert client.slice({"d": 2}).island == 0  # any island: the one still whole
        s.release()  # the registry forgets the departed host once nothing uses its island
        assert [(h.island, h.host) for h in local.controller.resources.hosts()] == [(0, 0)]
        local.controller.health.register_host(worker.info())  # and it may join again
        again = client.slice({"d": 2}, island=1)
        y = client.put(np.arange(2, dtype=np.float32), again, P("d"))
        np.testing.assert_array_equal(y.fetch(), [0, 1])
