"""The fan-out tree of an island (scheduler.fanout): the controller dispatches each batch to a few
hosts and they forward it to the rest (runtime.worker.forward); every host still gets the whole
order, and a host the tree cannot reach fails its island with a clear error, never a hang."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb
from proto.config import ClusterConfig
from proto.errors import HostLostError
from runtime.sim import SimCluster
from runtime.worker.distributed import free_port
from runtime.worker.forward import positions, subtree
from scheduler.fanout import apply, plan

HOSTS = 16


def reached(targets):
    return [host for target in targets for host in subtree(target)]


@pytest.mark.parametrize("hosts,fanout", [(1, 4), (5, 8), (16, 4), (64, 8), (100, 3)])
def test_the_tree_reaches_every_host_once(hosts, fanout):
    routes = plan([(h, f"a:{h}") for h in range(hosts)], fanout)
    roots = [h for h, forward in routes.items() if forward is not None]
    assert roots == list(range(min(fanout, hosts)))
    everyone = roots + [h for root in roots for h in reached(routes[root])]
    assert sorted(everyone) == list(range(hosts))


def test_no_tree_below_its_size_or_for_a_link_that_is_not_caught_up():
    class Link:
        def __init__(self, host, idle=True):
            self.address, self.failed, self._idle, self.routed = f"a:{host}", "", idle, "?"

        def idle(self):
            return self._idle

        def route(self, forward):
            self.routed = forward

    links = {h: Link(h, idle=h != 9) for h in range(17)}
    apply(links, fanout=4, min_hosts=16)
    assert links[9].routed == []  # catching up: a Dispatch of its own
    assert [h for h, link in links.items() if link.routed is None]  # the rest: a tree
    assert 9 not in reached(t for link in links.values() if link.routed for t in link.routed)
    small = {h: Link(h) for h in range(8)}
    apply(small, fanout=4, min_hosts=16)
    assert all(link.routed == [] for link in small.values())


def test_a_failed_forward_names_the_host_and_the_ones_below_it():
    target = pb.ForwardTarget(host=3, address="a:3", forward=[pb.ForwardTarget(host=7)])
    failed = positions(target, None, "forwarding the order to host 3 (a:3) failed: UNAVAILABLE")
    assert [(p.host, p.error.startswith("forwarding")) for p in failed] == [(3, True), (7, False)]
    assert failed[1].error.startswith("not reached")


def config(fanout=4):
    return ClusterConfig.from_env().replace(fanout=fanout, fanout_min_hosts=HOSTS)


def test_an_island_in_a_tree_runs_its_order_on_every_host():
    with SimCluster(islands=1, hosts_per_island=HOSTS, devices_per_host=1,
                    config=config()) as sim:
        with sim.client() as client:
            s = client.slice({"d": HOSTS})
            x = client.put(np.arange(HOSTS, dtype=np.float32), s, P("d"))
            f = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
            for _ in range(30):
                x = f(x)
            x.fetch(timeout=60)
            client.sync()
            links = sim.controller.catalog.scheduler(0)._links
            assert sum(link.relayed for link in links.values()) == HOSTS - 4
            sequence = sim.controller.catalog.scheduler(0).sequence
            status = client.status()
            assert all(h.received == sequence and h.executed == sequence for h in status.hosts)


def test_a_host_the_tree_cannot_reach_fails_its_island_with_its_name():
    # The other hosts must not register again meanwhile (they do after 3 s without a call from
    # the controller, which a loaded machine can cause): that would restart the island, and host
    # 15 would come back from its real address.
    with SimCluster(islands=1, hosts_per_island=HOSTS, devices_per_host=1,
                    config=config().replace(registration_silence_s=120)) as sim:
        controller = sim.controller
        (last,) = [h for h in controller.resources.island_hosts(0) if h.host == HOSTS - 1]
        # Host 15 registers again from an address where nothing listens (before the island has
        # any work: nothing to catch up, so it joins the tree as a leaf).
        dead = f"127.0.0.1:{free_port()}"
        controller.health.register_host(pb.HostInfo(island=0, host=HOSTS - 1, address=dead,
                                             num_devices=1, platform=last.platform,
                                             backend="sim"))
        assert controller.catalog.scheduler(0)._links[HOSTS - 1].relayed
        with sim.client() as client:
            with pytest.raises(HostLostError) as lost:
                s = client.slice({"d": HOSTS})
                x = client.put(np.zeros(HOSTS, np.float32), s, P("d"))
                x.fetch(timeout=30)
        # Named by the tree ("not reached through the fan-out tree") or, when the tree is slower
        # than SchedulerConfig.relay_timeout_s on a loaded machine, by the direct send after it.
        message = str(lost.value)
        assert f"host 0.{HOSTS - 1} ({dead})" in message, message


class _IdleLoop:
    """A link loop that runs nothing: the link's own bookkeeping alone."""

    def submit(self, coroutine):
        coroutine.close()

    def call(self, fn, *args):
        pass


class _Events:
    island, controller_id, epoch, channel_metadata = 0, "controller", 0, ()
    config = ClusterConfig().scheduler


def _ops(*sequences):
    return [pb.Instruction(sequence=q, delete=pb.DeleteInstruction(array_ids=[q]))
            for q in sequences]


def test_a_new_tree_sends_a_relayed_host_directly_what_it_has_not_acknowledged():
    """The old parent may have been taken out of the tree before passing a batch on, and the
    new one may have passed it on before the host was below it: at every change of the tree a
    relayed host gets, directly, what it has not acknowledged; later batches come by the tree."""
    from scheduler.delivery import HostLink

    link = HostLink(_Events(), 5, "nowhere:1", loop=_IdleLoop())
    link.route(None)
    link.send(_ops(1, 2, 3))
    assert link._next_batch() == ([], [])  # relayed: nothing of its own to send
    assert [op.sequence for op in link.unacknowledged()] == [1, 2, 3]
    link.acked = 1
    link.route(None)  # the tree changed; the host is still relayed
    batch, forward = link._next_batch()
    assert [op.sequence for op in batch] == [2, 3] and forward == []
    link.send(_ops(4))  # by the tree
    assert link._next_batch() == ([], [])
    target = pb.ForwardTarget(host=6, address="a:6")
    link.route([target])  # now a root: #4 directly, forwarded below it
    batch, forward = link._next_batch()
    assert [op.sequence for op in batch] == [4] and list(forward) == [target]


def test_what_the_tree_did_not_bring_in_time_goes_directly():
    from scheduler.delivery import HostLink

    class Events(_Events):
        config = ClusterConfig().replace(relay_timeout_s=0.0).scheduler

    link = HostLink(Events(), 5, "nowhere:1", loop=_IdleLoop())
    link.route(None)
    link.send(_ops(1, 2, 3))
    link.acked = 1
    link.check_relayed()  # #2 and #3 are overdue (a timeout of 0)
    batch, _ = link._next_batch()
    assert [op.sequence for op in batch] == [2, 3]
    link.send(_ops(4))
    Events.config = ClusterConfig().replace(relay_timeout_s=60.0).scheduler
    link.config = Events.config
    link.check_relayed()  # not overdue: it stays with the tree
    assert link._next_batch() == ([], [])
