"""A host's forwarding of the island's order down its fan-out tree (runtime.worker.forward, and
runtime.sim's in-memory hand-over): one forwarded call in flight per host below, what waits merged
behind it; the reply never waits for the hosts below, whose places or failures come back with a
later reply (the tree itself: tests/test_fanout.py)."""

from proto import pathways_pb2 as pb


def _ops(*sequences):
    return [pb.Instruction(sequence=q, delete=pb.DeleteInstruction(array_ids=[q]))
            for q in sequences]


def _request(*sequences, controller="c", epoch=0, forward=()):
    return pb.DispatchRequest(controller_id=controller, epoch=epoch, instructions=_ops(*sequences),
                              forward=list(forward))


class _Calls:
    """A `start` for relays whose calls end only when the test says so."""

    def __init__(self):
        self.started = []  # (request, done)

    def __call__(self, request, target, timeout, done):
        self.started.append((request, done))

    def sequences(self, index):
        return [ins.sequence for ins in self.started[index][0].instructions]


def test_a_relay_keeps_one_call_in_flight_and_merges_what_waits():
    from runtime.worker.forward import Relay

    calls = _Calls()
    relay = Relay(calls)
    child = pb.ForwardTarget(host=9, address="a:9")
    target = pb.ForwardTarget(host=3, address="a:3", forward=[child])
    relay.pass_on(_request(1, 2), target, 5.0)
    relay.pass_on(_request(3), target, 5.0)  # the first call has not ended: they wait
    relay.pass_on(_request(2, 3, 4), target, 5.0)  # a resend overlapping what waits: once each
    relay.pass_on(_request(5, controller="other"), target, 5.0)  # another order: on its own
    assert len(calls.started) == 1 and calls.sequences(0) == [1, 2]
    assert list(calls.started[0][0].forward) == [child]  # the target's own subtree
    assert relay.take_positions() == []
    calls.started[0][1](pb.DispatchReply(received=2, executed=1), "")
    assert len(calls.started) == 2 and calls.sequences(1) == [2, 3, 4]  # in order
    [position] = relay.take_positions()
    assert (position.host, position.received, position.executed) == (3, 2, 1)
    assert relay.take_positions() == []  # each found once
    calls.started[1][1](None, "forwarding the order to host 3 (a:3) failed: UNAVAILABLE")
    assert len(calls.started) == 2  # what waited behind the failure is dropped
    failed = relay.take_positions()
    assert [(p.host, p.error.split(":")[0]) for p in failed] == [
        (3, "forwarding the order to host 3 (a"), (9, "not reached")]
    relay.pass_on(_request(6), target, 5.0)  # later batches start afresh
    assert len(calls.started) == 3 and calls.sequences(2) == [6]


def test_a_relay_that_cannot_start_a_call_reports_the_host():
    from runtime.worker.forward import Relay

    def start(request, target, timeout, done):
        raise ValueError("Cannot invoke RPC on closed channel!")

    relay = Relay(start)
    relay.pass_on(_request(1), pb.ForwardTarget(host=4, address="a:4"), 5.0)
    relay.pass_on(_request(2), pb.ForwardTarget(host=4, address="a:4"), 5.0)  # not stuck busy
    errors = [p.error for p in relay.take_positions()]
    assert len(errors) == 2 and all("host 4 (a:4)" in e and "closed channel" in e for e in errors)


def test_a_slow_host_below_holds_neither_the_reply_nor_the_next_batch():
    """A real host's Forwarder against a host whose Dispatch blocks: forward() returns at once;
    the next batches wait merged behind the call under way and go as one call when it ends;
    what the calls found comes back with a later forward()."""
    import threading
    import time

    import grpc
    from concurrent import futures

    from proto import pathways_pb2_grpc as pb_grpc
    from runtime.worker.forward import Forwarder

    release, received = threading.Event(), []

    class Slow(pb_grpc.WorkerServicer):
        def Dispatch(self, request, context):
            received.append([ins.sequence for ins in request.instructions])
            release.wait(30)
            return pb.DispatchReply(received=request.instructions[-1].sequence)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_WorkerServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    forwarder = Forwarder(None)
    target = pb.ForwardTarget(host=1, address=f"127.0.0.1:{port}")
    try:
        began = time.monotonic()
        for first in (1, 3, 5):
            assert forwarder.forward(_request(first, first + 1, forward=[target]), 30.0) == []
        assert time.monotonic() - began < 5.0  # not 30 s: nobody waits for the slow host
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [[1, 2]]  # one call in flight
        release.set()
        found = []
        while len(found) < 2 and time.monotonic() < deadline:
            found += forwarder.forward(_request(forward=()), 30.0)  # a Dispatch of its own
            time.sleep(0.01)
        assert received == [[1, 2], [3, 4, 5, 6]]  # what waited, merged into one call
        assert [(p.host, p.received, p.error) for p in found] == [(1, 2, ""), (1, 6, "")]
    finally:
        forwarder.close()
        server.stop(None)


def test_simulated_hosts_of_one_process_pass_the_tree_on_in_memory():
    """A simulated host hands a batch to the hosts below it that live in its own process without
    a gRPC call (hundreds of them in one process would queue behind each other on one core), the
    whole subtree in one turn of the loop after its reply; a host elsewhere is still called over
    gRPC, and its failure comes back up the tree."""
    import asyncio
    import socket

    from runtime.sim import SimConfig, SimIslands

    with socket.socket() as s:  # no controller: the hosts are driven by hand
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"

    async def scenario():
        sim = SimIslands(nobody, [0], 4, SimConfig(devices_per_host=1))
        await sim.start()
        try:
            h = sim.hosts
            leaf = pb.ForwardTarget(host=3, address=h[3].address)
            gone = pb.ForwardTarget(host=9, address=nobody)
            request = pb.DispatchRequest(
                controller_id="c", instructions=_ops(1, 2), forward=[
                    pb.ForwardTarget(host=1, address=h[1].address, forward=[leaf]),
                    pb.ForwardTarget(host=2, address=h[2].address), gone])
            first = h[0].dispatch(request, timeout=5.0)
            assert first.received == 2 and list(first.forwarded) == []  # it did not wait
            await asyncio.sleep(0)  # one turn of the loop: the whole subtree in this process
            assert [host._received for host in h] == [2, 2, 2, 2]
            positions = {}
            for _ in range(200):
                await asyncio.sleep(0.01)
                later = h[0].dispatch(pb.DispatchRequest(controller_id="c"), timeout=5.0)
                positions.update({p.host: p for p in later.forwarded})
                if {1, 2, 9} <= positions.keys():
                    break
            assert [host._received for host in h] == [2, 2, 2, 2]  # host 3: two hops down
            assert positions[1].received == 2 and positions[2].received == 2
            assert nobody in positions[9].error
            assert set(sim._transfers._channels) == {nobody}  # gRPC only to the host elsewhere

            # Deeper down: a host of this process with a host elsewhere below it calls that one
            # itself; the others below it still get the batch in memory.
            deeper = pb.DispatchRequest(controller_id="c", instructions=_ops(3), forward=[
                pb.ForwardTarget(host=1, address=h[1].address, forward=[
                    pb.ForwardTarget(host=3, address=h[3].address),
                    pb.ForwardTarget(host=8, address=nobody)])])
            positions = {}
            for _ in range(200):
                reply = h[0].dispatch(deeper, timeout=5.0)
                positions.update({p.host: p for p in reply.forwarded})
                if 8 in positions:
                    break
                await asyncio.sleep(0.01)
            assert h[1]._received == 3 and h[3]._received == 3
            assert positions[3].received == 3 and nobody in positions[8].error
        finally:
            await sim.stop(unregister=False)

    asyncio.run(scenario())
