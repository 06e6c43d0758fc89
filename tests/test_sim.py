"""The simulated platform end to end: 64 simulated hosts (2 islands x 32) over real gRPC, one
controller; slices across hosts, small puts and fetches, chained calls, programs, transfers, the
FLOP-based cost model, and the gang-order negative control, which hangs on simulated devices as it
does on real ones and is reported past a short deadline."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from runtime import DeadlineExceededError
from proto import rpc as _rpc
from proto import wire as _wire
from runtime.cli import format_status
from runtime.sim import SimCluster, per_device_flops

HOSTS = 32  # per island
DEVICES = 2  # per host
FLOPS_PER_S = 1e11
DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def sim():
    with SimCluster(islands=2, hosts_per_island=HOSTS, devices_per_host=DEVICES,
                    flops_per_s=FLOPS_PER_S, execution_deadline_s=DEADLINE_S) as cluster:
        yield cluster


def timelines(cluster, island, since=0.0):
    """Per host of the island: {sequence: (start, end)} of its executions."""
    out = {}
    for h in cluster.controller.resources.island_hosts(island):
        with _rpc.open_channel(h.address, cluster._cluster_credentials) as channel:
            reply = pb_grpc.WorkerStub(channel).GetTimeline(pb.GetTimelineRequest(since=since),
                                                            timeout=10)
        out[h.host] = {e.sequence: (e.start, e.end) for e in reply.events}
    return out


def matmul_step(mesh, n):
    """x -> x + (x[0] broadcast to (n, n), squared)[0, :1], per device, then a mean over the
    slice: 2 n^3 FLOPs per device and a collective across every host."""
    def per_device(x):
        m = jnp.broadcast_to(x[0], (n, n))
        return jax.lax.pmean(x + (m @ m)[0, :1], "d")
    return lambda x: jax.shard_map(per_device, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(x)


def export(fn, mesh, spec, shape):
    sharding = jax.sharding.NamedSharding(mesh, spec)
    aval = jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(fn, in_shardings=sharding, out_shardings=sharding),
                                     platforms=("cpu",))(aval)
    value = pb.ValueSpec(dtype="float32", shape=shape, sharding=_wire.spec_to_proto(0, spec))
    return bytes(exported.serialize()), [value]


def test_cost_model_counts_flops_per_device():
    """XLA's count of a shard_map body is per device already; a global computation's is divided
    over the slice's devices."""
    mesh = jax.sharding.AbstractMesh((8,), ("d",))
    n = 64
    serialized, inputs = export(matmul_step(mesh, n), mesh, P("d"), (8,))
    assert per_device_flops(serialized, inputs, (8,), ("d",)) == pytest.approx(2 * n ** 3, rel=0.01)
    serialized, inputs = export(lambda a: a @ a.T @ a, mesh, P("d"), (64, 64))
    global_flops = 2 * 2 * 64 ** 3
    assert per_device_flops(serialized, inputs, (8,), ("d",)) == pytest.approx(global_flops / 8,
                                                                                rel=0.01)


def test_a_hosts_layout_of_an_array_is_its_share_of_the_slice():
    """Layout.of, laid out once per slice and array, gives each host the distinct shards its
    devices hold and their bytes (replicas counted), as a host-by-host count does; a host
    without devices in the slice holds nothing."""
    from runtime.sim._executable import Layout

    info = pb.SliceInfo(slice_id=3, mesh_shape=[4, 2], axis_names=["x", "y"])
    for position in range(8):
        info.devices.add(host=position // 3)  # hosts 0, 1: 3 devices; host 2: 2
    cases = [(), (("x",),), ((), ("y",)), (("x", "y"),), (("y",), ("x",))]
    for dims in cases:
        sharding = pb.Sharding(slice_id=3, dims=[pb.DimSharding(axes=axes) for axes in dims])
        groups = _wire.slice_shard_groups((8, 4), info, sharding)
        for host in range(4):
            local = {p for p, d in enumerate(info.devices) if d.host == host}
            want = [(index, len(local.intersection(ps))) for index, ps in groups
                    if local.intersection(ps)]
            layout = Layout.of([8, 4], "float32", sharding, info, host)
            assert layout.indices == tuple(index for index, _ in want), (dims, host)
            assert layout.nbytes == sum(
                np.prod(_wire.shard_shape(index)) * 4 * here for index, here in want)
            assert layout.shape == (8, 4) and layout.dtype == np.float32
    assert Layout.of([8, 4], "float32", pb.Sharding(slice_id=3), info, 3).indices == ()


def test_64_hosts_registered_and_a_slice_spans_an_island(sim):
    with runtime.Client(sim.address) as client:
        status = client.status()
        assert len(status.hosts) == 2 * HOSTS
        assert {h.backend for h in status.hosts} == {"sim"}
        assert all(h.distributed_hosts == HOSTS and h.state == "alive" for h in status.hosts)
        s = client.slice({"d": HOSTS * DEVICES}, island=0)
        assert {d.host for d in s.info.devices} == set(range(HOSTS))
        x = np.arange(HOSTS * DEVICES * 4, dtype=np.float32).reshape(-1, 4)
        rx = client.put(x, s, P("d"))  # small: every host keeps its shard's data
        np.testing.assert_array_equal(rx.fetch(), x)
        replicated = client.put(x, s, P())
        np.testing.assert_array_equal(replicated.fetch(), x)


def test_chained_calls_hold_all_hosts_for_the_cost_models_duration(sim):
    """Ten chained calls on a slice of all 32 hosts: every host runs each at the same simulated
    time, for XLA's per-device FLOPs over the set FLOP/s; outputs are shapes (zeros on fetch)."""
    n = 256
    with runtime.Client(sim.address) as client:
        s = client.slice({"d": HOSTS * DEVICES}, island=0)
        x = client.put(np.ones(HOSTS * DEVICES, np.float32), s, P("d"))
        f = client.jit(matmul_step(s.mesh, n), s, in_specs=P("d"), out_specs=P("d"),
                       name="matmul_step").lower(x)
        began = time.time()
        y = x
        for _ in range(10):
            y = f(y)
        out = y.fetch(timeout=60)
        assert out.shape == (HOSTS * DEVICES,) and out.dtype == np.float32
        np.testing.assert_array_equal(out, 0)  # computed arrays have no data: zeros
        client.sync()
        matmul_s = 2 * n ** 3 / FLOPS_PER_S  # XLA counts a few element-wise FLOPs more
        per_host = timelines(sim, 0, since=began)
        calls = sorted(per_host[0])[-10:]
        assert len(calls) == 10
        for sequence in calls:
            runs = {runs[sequence] for runs in per_host.values()}
            assert len(runs) == 1  # the same start and end on all 32 hosts
            start, end = runs.pop()
            assert end - start == pytest.approx(matmul_s, rel=0.01)
        starts = [per_host[0][q][0] for q in calls]
        ends = [per_host[0][q][1] for q in calls]
        assert all(b >= a for a, b in zip(ends, starts[1:]))  # strictly one after another


def test_a_program_and_a_one_host_slice(sim):
    with runtime.Client(sim.address) as client:
        wide = client.slice({"d": HOSTS * DEVICES}, island=0)
        narrow = client.slice({"d": DEVICES}, island=0)
        assert len({d.host for d in narrow.info.devices}) == 1
        double = client.jit(lambda v: v * 2, wide, in_specs=P("d"), out_specs=P("d"),
                            name="double")

        @client.program
        def three(v):
            return double(double(double(v)))

        v = client.put(np.ones((HOSTS * DEVICES, 8), np.int32), wide, P("d"))
        outs = [three(v) for _ in range(3)]
        for out in outs:
            assert out.fetch(timeout=60).shape == (HOSTS * DEVICES, 8)
        assert three.traces == 1
        local = client.jit(lambda v: v + 1, narrow, in_specs=P("d"), out_specs=P("d"),
                           name="local")
        small = client.put(np.arange(2 * DEVICES, dtype=np.float32), narrow, P("d"))
        assert local(small).fetch(timeout=30).shape == (2 * DEVICES,)


def test_transfers_between_slices_and_islands_keep_small_data(sim):
    with runtime.Client(sim.address) as client:
        narrow = client.slice({"d": DEVICES}, island=0)
        wide = client.slice({"d": HOSTS * DEVICES}, island=0)
        other = client.slice({"d": 4 * DEVICES}, island=1)
        x = np.arange(HOSTS * DEVICES * 2, dtype=np.float32)
        moved = client.put(x, narrow, P("d")).to(wide, P("d"))
        np.testing.assert_array_equal(moved.fetch(timeout=60), x)
        across = moved.to(other, P())  # gathered from 32 hosts, sent to another island
        np.testing.assert_array_equal(across.fetch(timeout=60), x)


def test_large_arrays_are_shapes_only(sim):
    """A put above the data limit (64 KiB per host) keeps the shape: reads give zeros."""
    with runtime.Client(sim.address) as client:
        s = client.slice({"d": DEVICES}, island=0)
        big = np.ones((256, 1024), np.float32)  # 1 MiB on one host
        r = client.put(big, s, P("d"))
        out = r.fetch()
        assert out.shape == big.shape and not out.any()


def test_hostile_requests_to_a_simulated_host(sim):
    """2,000 malformed or nonsensical requests (tests/test_fuzz.py's fuzzer) to a simulated host
    get canonical status codes; it goes on serving: a stored array is intact, new work runs."""
    import grpc
    from test_fuzz import Fuzzer, _send

    with runtime.Client(sim.address, name="victim") as victim, \
            runtime.Client(sim.address, name="attacker") as attacker:
        s = victim.slice({"d": DEVICES}, island=0)
        data = np.arange(16, dtype=np.float32).reshape(8, 2)
        stored = victim.put(data, s, P("d"))
        known = [attacker.session_id, victim.session_id, s.slice_id, stored.id, 0, 1]
        address = s.info.host_addresses[s.info.devices[0].host]
        with _rpc.open_channel(address, attacker.credentials,
                                attacker._call_metadata()) as channel:
            codes = _send(channel, "Worker", Fuzzer(3, known), 2000)
            huge = b"\x1a" + b"\xff" * (_wire.MAX_MESSAGE_BYTES + 1024)
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/pathways.Worker/Dispatch")(huge, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 200, codes
        assert codes[grpc.StatusCode.PERMISSION_DENIED] > 100, codes  # Dispatch, others' arrays
        np.testing.assert_array_equal(stored.fetch(), data)
        double = victim.jit(lambda a: a * 2, s, in_specs=P("d"), out_specs=P("d"))
        assert double(stored).fetch(timeout=30).shape == data.shape


def test_misordered_steps_hang_and_the_deadline_reports_it(sim):
    """Negative control (as tests/test_gang.py does with real processes): two steps reach the two
    hosts of a slice in opposite orders, bypassing the gang scheduler. Each host waits at a
    computation the other never reaches: a hang, reported past the 1 s deadline naming the
    computation, the host that reached it and the one that did not; the island refuses work."""
    client = runtime.Client(sim.address, name="control")
    try:
        s = client.slice({"x": 2, "y": DEVICES}, island=1)  # "x" runs across two hosts
        hosts = sorted({d.host for d in s.info.devices})
        assert len(hosts) == 2

        def psum_over(axes):
            return lambda v: jax.shard_map(lambda b: jax.lax.psum(b, axes), mesh=s.mesh,
                                           in_specs=P(("x", "y")), out_specs=P(("x", "y")))(v)

        spec = P(("x", "y"))
        xa = xb = client.put(np.ones((4, 8), np.int32), s, spec)
        fa = client.jit(psum_over(("x", "y")), s, in_specs=spec, out_specs=spec,
                        name="step_a").lower(xa)
        fb = client.jit(psum_over("x"), s, in_specs=spec, out_specs=spec, name="step_b").lower(xb)
        fa(xa).fetch(timeout=30)  # in gang order both complete
        fb(xb).fetch(timeout=30)
        client.sync()

        base = sim.controller.catalog.scheduler(1).sequence
        out_a, out_b = client._new_id(), client._new_id()

        def execute(sequence, f, x, out):
            return pb.Instruction(sequence=sequence, execute=pb.ExecuteInstruction(
                executable_id=f.executable_id, inputs=[x.id], outputs=[out],
                session_id=client.session_id))

        orders = {hosts[0]: [execute(base + 1, fa, xa, out_a), execute(base + 2, fb, xb, out_b)],
                  hosts[1]: [execute(base + 1, fb, xb, out_b), execute(base + 2, fa, xa, out_a)]}
        island = {h.host: h for h in sim.controller.resources.island_hosts(1)}
        for host, order in orders.items():
            with _rpc.open_channel(island[host].address, sim._cluster_credentials) as channel:
                pb_grpc.WorkerStub(channel).Dispatch(pb.DispatchRequest(
                    controller_id=sim.controller.controller_id, instructions=order), timeout=10)

        a = runtime.RemoteArray(client, out_a, (4, 8), np.int32, spec, s, base + 1)
        with pytest.raises(DeadlineExceededError) as caught:
            a.fetch(timeout=30)
        report = str(caught.value)
        assert f"exceeded its {DEADLINE_S:g} s deadline" in report
        assert "reached by host 1." in report and "not reached by host 1." in report
        assert "step_a" in report and "step_b" in report  # one waits; the other is elsewhere

        for _ in range(100):  # the other host's deadline fires a moment later
            status = client.status()
            stuck = [h for h in status.hosts if h.island == 1 and h.host in hosts]
            if all(h.hang for h in stuck):
                break
            time.sleep(0.05)
        assert all(h.state == "hung" and h.activity.startswith("stuck: running step_")
                   for h in stuck)
        assert "exceeded" in status.islands[1].failure
        assert "hang: " in format_status(sim.address, status)
        with pytest.raises(DeadlineExceededError):  # the island refuses work until it restarts
            fa(xa).fetch(timeout=10)
        # The other island is unaffected.
        s0 = client.slice({"d": DEVICES}, island=0)
        ok = client.jit(lambda v: v + 1, s0, in_specs=P("d"), out_specs=P("d"), name="ok")
        assert ok(client.put(np.zeros(DEVICES, np.float32), s0, P("d"))).fetch(timeout=30).shape
    finally:
        client.close()


def test_a_process_whose_controller_is_gone_stops_at_once():
    """32 simulated hosts whose controller has gone silent try to register again (each attempt
    retries for seconds against a dead address); stopping the process drops those attempts
    instead of queueing the departures behind them."""
    import asyncio
    import socket

    from runtime.sim import SimConfig, SimIslands

    with socket.socket() as s:  # an address nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def scenario() -> float:
        sim = SimIslands(dead, [0], 32, SimConfig(devices_per_host=1))
        await sim.start()
        for host in sim.hosts:  # registered, then silent for a minute
            host.last_contact = time.monotonic() - 60
            sim._registered_at[(host.island, host.host)] = time.monotonic() - 60
        watcher = asyncio.get_running_loop().create_task(sim.keep_registered())
        await asyncio.sleep(1.0)  # a check has queued 32 registrations
        watcher.cancel()
        began = time.monotonic()
        await sim.stop(unregister=True)
        return time.monotonic() - began

    assert asyncio.run(scenario()) < 5.0
