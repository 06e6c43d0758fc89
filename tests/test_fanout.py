"""The fan-out tree of an island (scheduler.fanout): the controller dispatches each batch to a few
hosts and they forward it to the rest (runtime.worker.forward); every host still gets the whole
order, and a host the tree cannot reach fails its island with a clear error, never a hang."""

import collections
import time

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


def depth(target, level=1):
    return max([level, *(depth(child, level + 1) for child in target.forward)])


@pytest.mark.parametrize("hosts,fanout,roots", [(1, 4, 1), (5, 8, 1), (16, 4, 1), (64, 8, 1),
                                                (100, 3, 1), (16, 4, 4), (64, 8, 8), (7, 2, 3)])
def test_the_tree_reaches_every_host_once(hosts, fanout, roots):
    routes = plan([(h, f"a:{h}") for h in range(hosts)], fanout, roots)
    dispatched = [h for h, forward in routes.items() if forward is not None]
    assert dispatched == list(range(min(roots, hosts)))  # the controller's messages per batch
    everyone = dispatched + [h for root in dispatched for h in reached(routes[root])]
    assert sorted(everyone) == list(range(hosts))
    # No host forwards to more than `fanout`, and the levels grow by `fanout` each.
    targets = [t for root in dispatched for t in routes[root]]
    assert all(len(routes[root]) <= fanout for root in dispatched)
    while targets:
        assert all(len(t.forward) <= fanout for t in targets)
        targets = [child for t in targets for child in t.forward]


def test_one_root_reaches_64_hosts_in_three_levels():
    routes = plan([(h, f"a:{h}") for h in range(64)], fanout=8, roots=1)
    assert [h for h, forward in routes.items() if forward is not None] == [0]
    assert [t.host for t in routes[0]] == list(range(1, 9))
    assert max(depth(t) for t in routes[0]) == 2  # below the root: 8, then 55


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


def config(fanout=4, roots=1):
    return ClusterConfig.from_env().replace(fanout=fanout, fanout_roots=roots,
                                            fanout_min_hosts=HOSTS)


@pytest.mark.parametrize("roots", [1, 4])
def test_an_island_in_a_tree_runs_its_order_on_every_host(roots):
    with SimCluster(islands=1, hosts_per_island=HOSTS, devices_per_host=1,
                    config=config(roots=roots)) as sim:
        with sim.client() as client:
            s = client.slice({"d": HOSTS})
            x = client.put(np.arange(HOSTS, dtype=np.float32), s, P("d"))
            f = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
            for _ in range(30):
                x = f(x)
            x.fetch(timeout=60)
            client.sync()
            links = sim.controller.catalog.scheduler(0)._links
            assert sum(link.relayed for link in links.values()) == HOSTS - roots
            sequence = sim.controller.catalog.scheduler(0).sequence
            status = client.status()
            assert all(h.received == sequence and h.executed == sequence for h in status.hosts)


def test_real_hosts_forward_the_order_through_the_tree():
    """Worker processes in a tree of fan-out 1 (a chain: the controller dispatches to host 0,
    which forwards to 1, which forwards to 2): every host runs the whole order."""
    hosts = 3
    with runtime.ProcessCluster(islands=1, hosts_per_island=hosts, devices_per_host=1,
                                config=config(fanout=1).replace(fanout_min_hosts=2)) as cluster:
        with cluster.client() as client:
            s = client.slice({"d": hosts})
            x = client.put(np.arange(hosts, dtype=np.float32), s, P("d"))
            f = client.jit(lambda v: v * 2, s, in_specs=P("d"), out_specs=P("d"))
            for _ in range(10):
                x = f(x)
            np.testing.assert_array_equal(x.fetch(timeout=60),
                                          np.arange(hosts, dtype=np.float32) * 1024)
            links = cluster.controller.catalog.scheduler(0)._links
            assert [links[h].relayed for h in range(hosts)] == [False, True, True]


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
        # than SchedulerConfig.relay_timeout_s on a loaded machine, by the direct send after it,
        # or by the heartbeat's ping, which can declare it lost while the tree's report arrives.
        message = str(lost.value)
        assert f"host 0.{HOSTS - 1} ({dead})" in message, message


class _IdleLoop:
    """A link loop that runs nothing: the link's own bookkeeping alone."""

    def submit(self, coroutine):
        coroutine.close()

    def call(self, fn, *args):
        pass

    def on_loop(self):  # nothing to wait for when the link closes
        return True


class _CallingLoop(_IdleLoop):
    """An idle link loop that runs what is handed to it at once."""

    def call(self, fn, *args):
        fn(*args)


class _Events:
    island, controller_id, epoch, channel_metadata = 0, "controller", 0, ()
    config = ClusterConfig().scheduler


def _ops(*sequences):
    return [pb.Instruction(sequence=q, delete=pb.DeleteInstruction(array_ids=[q]))
            for q in sequences]


def _idle_tree(config, counted, counts):
    """A gang scheduler of an island big enough for a fan-out tree (fanout_min_hosts + 8
    hosts), its links on an idle loop, each call of their method `counted` counted by host in
    `counts`; and its number of hosts."""
    from scheduler.delivery import HostLink
    from scheduler.gang import GangScheduler

    def count(self, *args, **kwargs):
        counts[self.host] += 1
        return getattr(HostLink, counted)(self, *args, **kwargs)

    class Link(HostLink):
        def __init__(self, scheduler, host, address):
            super().__init__(scheduler, host, address, loop=_IdleLoop())

    setattr(Link, counted, count)
    scheduler = GangScheduler(0, "controller", lambda *report: None, link_factory=Link,
                              config=config)
    hosts = config.fanout_min_hosts + 8
    for host in range(hosts):
        scheduler.set_host(host, f"a:{host}")
    return scheduler, hosts


def test_a_new_tree_sends_a_relayed_host_directly_what_it_has_not_acknowledged():
    """The old parent may have been taken out of the tree before passing a batch on, and the
    new one may have passed it on before the host was below it: at every change of the tree a
    relayed host gets, directly, what it has not acknowledged; later batches come by the tree."""
    from scheduler.delivery import HostLink

    link = HostLink(_Events(), 5, "nowhere:1", loop=_IdleLoop())
    link.route(None)
    link.send(_ops(1, 2, 3))
    assert link._next_batch() == ([], [], False)  # relayed: nothing of its own to send
    assert [op.sequence for op in link.unacknowledged()] == [1, 2, 3]
    link.acked = 1
    link.route(None)  # the tree changed; the host is still relayed
    batch, forward, _ = link._next_batch()
    assert [op.sequence for op in batch] == [2, 3] and forward == []
    link.send(_ops(4))  # by the tree
    assert link._next_batch() == ([], [], False)
    target = pb.ForwardTarget(host=6, address="a:6")
    link.route([target])  # now a root: #4 directly, forwarded below it
    batch, forward, _ = link._next_batch()
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
    batch, _, _ = link._next_batch()
    assert [op.sequence for op in batch] == [2, 3]
    link.send(_ops(4))
    Events.config = ClusterConfig().replace(relay_timeout_s=60.0).scheduler
    link.config = Events.config
    link.check_relayed()  # not overdue: it stays with the tree
    assert link._next_batch() == ([], [], False)


def test_the_heartbeat_asks_a_root_for_an_empty_dispatch_down_its_tree():
    """A root of a fan-out tree sends an empty Dispatch to its subtrees when the heartbeat asks
    (keep_alive), once, and not when a batch goes anyway or went lately; a relayed host gets none
    (its root's reaches it), nor does a direct host that reports at the usual idle interval,
    while one whose stream still reports at the tree's rare interval does."""
    import time

    from scheduler.delivery import HostLink

    target = pb.ForwardTarget(host=6, address="a:6")
    root = HostLink(_Events(), 5, "nowhere:1", loop=_CallingLoop())
    root.route([target])
    root.keep_alive()
    assert root._next_batch() == ([], [target], True)
    assert root._next_batch() == ([], [target], False)  # once per request
    root.keep_alive()
    root.send(_ops(1))
    batch, _, _ = root._next_batch()  # the batch is the contact
    assert [op.sequence for op in batch] == [1] and root._next_batch() == ([], [target], False)
    root._dispatched_at = time.monotonic()  # a Dispatch was answered just now
    root.keep_alive(quiet_s=60.0)  # an island at work needs none
    assert root._next_batch() == ([], [target], False)

    relayed = HostLink(_Events(), 6, "nowhere:2", loop=_CallingLoop())
    relayed.route(None)
    relayed._stream_idle_s = _Events.config.progress_idle_tree_s
    relayed.keep_alive()
    assert relayed._next_batch() == ([], [], False)

    direct = HostLink(_Events(), 7, "nowhere:3", loop=_CallingLoop())
    direct.route([])
    direct._stream_idle_s = _Events.config.progress_idle_s
    direct.keep_alive()
    assert direct._next_batch() == ([], [], False)
    direct._stream_idle_s = _Events.config.progress_idle_tree_s  # opened while in a tree
    direct.keep_alive()
    assert direct._next_batch() == ([], [], True)


def test_an_idle_tree_hears_the_heartbeat_through_its_root(monkeypatch):
    """The hosts of an island in a fan-out tree report only every `progress_idle_tree_s` when
    idle (a report a second from each host came in bursts, one per island, after every
    command); the heartbeat's empty Dispatch to the root reaches them all through the tree: over
    seven heartbeats idle it pings none of them, hears from every one, and none registers again
    (each counts the Dispatch as the controller's contact; the limit is 3 s of silence)."""
    import time

    from scheduler.delivery import HostLink

    pings = []
    ping = HostLink._ping

    async def counted(self, timeout):
        pings.append(self.host)
        return await ping(self, timeout)

    monkeypatch.setattr(HostLink, "_ping", counted)
    rare = config().scheduler.progress_idle_tree_s
    with SimCluster(islands=1, hosts_per_island=HOSTS, devices_per_host=1,
                    config=config()) as sim:
        controller = sim.controller
        scheduler = controller.catalog.scheduler(0)
        links = scheduler._links
        deadline = time.monotonic() + 30
        while (any(link._stream_idle_s != rare for link in links.values())
               and time.monotonic() < deadline):
            time.sleep(0.1)  # each stream re-opens at its host's first report
        assert all(link.idle_interval_s == rare for link in links.values())
        assert sum(link.relayed for link in links.values()) == HOSTS - 1
        registered = {h.host: h.registered_at for h in controller.resources.island_hosts(0)}
        time.sleep(1.0)  # a heartbeat's contact has come down the whole tree
        pings.clear()
        time.sleep(3.5)
        assert pings == []
        assert scheduler.heard_lately(0.5) == set(range(HOSTS))
        assert {h.host: h.registered_at
                for h in controller.resources.island_hosts(0)} == registered


def test_the_relay_log_keeps_the_order_once_until_every_relayed_host_has_it():
    from scheduler.relaylog import RelayLog

    log = RelayLog()
    log.append(_ops(1, 2, 3))
    log.append(_ops(2, 3, 4))  # a repeat: kept once
    assert [op.sequence for op in log.after(1)] == [2, 3, 4] and log.count_after(3) == 1
    assert log.waiting_since(4) is None and log.waiting_since(0) is not None
    log.trim(2, hosts=1)
    assert [op.sequence for op in log.after(0)] == [3, 4] and log.last == 4
    assert not log.full()  # trimmed just now: full again past twice its length
    log.append(_ops(5, 6, 7))
    assert log.full()


def test_an_island_hands_its_order_to_the_roots_and_once_to_the_relay_log():
    """With a tree, each batch goes to the root's link and once into the island's relay log,
    not onto every relayed host's link; each relayed link still knows what the tree owes its
    host, and what every relayed host acknowledged leaves the log."""
    config = ClusterConfig().scheduler
    sent = collections.Counter()
    scheduler, hosts = _idle_tree(config, "send", sent)
    try:
        links = scheduler._links
        assert [h for h in range(hosts) if not links[h].relayed] == [0]
        sent.clear()
        ordered = scheduler.submit(_ops(0, 0)) + scheduler.submit(_ops(0))  # numbered here
        assert dict(sent) == {0: 2}  # the root only
        last = links[hosts - 1]
        assert [op.sequence for op in last.unacknowledged()] == ordered
        assert last.pending() == 3
        for link in links.values():
            link.acked = ordered[1]
        links[1].acked = ordered[0]
        scheduler.trim_relay_log()
        assert [op.sequence for op in scheduler.relay_log.after(0)] == ordered[1:]
        assert [op.sequence for op in last.unacknowledged()] == ordered[2:]
        links[1].failed = "lost"  # its host may register again: what it is owed stays
        scheduler.trim_relay_log()
        assert [op.sequence for op in links[1].unacknowledged()] == ordered[1:]
    finally:
        scheduler.close()


@pytest.mark.parametrize("timeout_s, direct", [(60.0, False), (0.0, True)])
def test_the_heartbeats_look_at_an_island_keeps_the_tree_and_sends_only_what_is_overdue(
        timeout_s, direct):
    """The heartbeat's round (scheduler.progress: keep_alive, heard_lately) asks only the
    links the island dispatches to for a keep-alive, names the hosts heard from lately, trims
    what every relayed host has from the relay log, and sends a relayed host directly what the
    tree has not brought it only once that waited past relay_timeout_s."""
    config = ClusterConfig().replace(relay_timeout_s=timeout_s).scheduler
    asked = collections.Counter()
    scheduler, hosts = _idle_tree(config, "keep_alive", asked)
    try:
        links = scheduler._links
        ordered = scheduler.submit(_ops(0, 0))
        for link in links.values():
            link.acked = ordered[0]
        links[0].acked = ordered[1]
        links[0].heard_at = links[3].heard_at = time.monotonic()
        scheduler.keep_alive()
        assert dict(asked) == {0: 1}  # the root only: its Dispatch goes down the tree
        assert scheduler.heard_lately(0.5) == {0, 3}
        assert [op.sequence for op in scheduler.relay_log.after(0)] == ordered[1:]
        batch, _, _ = links[hosts - 1]._next_batch()
        assert [op.sequence for op in batch] == (ordered[1:] if direct else [])
    finally:
        scheduler.close()
