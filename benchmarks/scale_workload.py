"""The workload of `pathways bench scale`: the dispatch benchmark's chain, sized for simulated devices.

As in benchmarks/dispatch_baselines.py, one *computation* is an all-reduce (pmean) across every
device of a slice plus an add, its output the next computation's input, and the three program
shapes submit that chain: OpByOp (one call per computation), Chained (a traced program of
PROGRAM_LENGTH calls, one command) and Fused (one function of PROGRAM_LENGTH computations). Here
each computation also squares an (n, n) matrix made from its input, on every device: 2 n^3 FLOPs,
so on simulated devices (runtime.sim: FLOPs from XLA's cost analysis over a set FLOP/s) n sets the
computation's duration. Nothing needs data: the matrix is a broadcast of the input. The Fused
program is unrolled, as XLA's cost analysis counts a loop body once.

One chain runs on each island, on a slice of all its devices, all islands at once, each driven
by a client of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from benchmarks.dispatch_baselines import PROGRAM_LENGTH, SHAPES
from runtime import PathwaysError

AXIS = "d"
SPEC = PartitionSpec(AXIS)


def matrix_size(duration_s: float, flops_per_s: float) -> int:
    """n such that squaring an (n, n) matrix (2 n^3 FLOPs) takes about `duration_s`."""
    return max(2, round((duration_s * flops_per_s / 2) ** (1 / 3)))


def _computation(x: jax.Array, n: int) -> jax.Array:
    """One computation on one device's shard x (1,): 2 n^3 FLOPs, then the slice's mean."""
    m = jnp.broadcast_to(x[0], (n, n))
    return jax.lax.pmean(x + (m @ m)[0, :1], AXIS) + 1.0


def make_step(mesh, n: int) -> Callable:
    """The OpByOp computation on a slice's (abstract) mesh."""
    return lambda x: jax.shard_map(lambda b: _computation(b, n), mesh=mesh, in_specs=SPEC,
                                   out_specs=SPEC)(x)


def make_fused(mesh, n: int, length: int = PROGRAM_LENGTH) -> Callable:
    """`length` computations in one function, unrolled (XLA counts a loop body once)."""
    def body(b):
        for _ in range(length):
            b = _computation(b, n)
        return b
    return lambda x: jax.shard_map(body, mesh=mesh, in_specs=SPEC, out_specs=SPEC)(x)


@dataclasses.dataclass
class Chain:
    """One island's chain: its slice, current value and the function of the point's shape."""

    island: int
    vslice: object
    x: object
    run: Callable | None = None  # x -> x', one unit (a call or a program)
    addresses: Sequence[str] = ()


def prepare(chains: Sequence[Chain], shape: str, n: int,
            length: int = PROGRAM_LENGTH) -> tuple[int, int]:
    """Binds each chain's unit of work for `shape`; returns (computations per unit, computations
    per execution: `length` for Fused, else 1). Loads the executables on the hosts (their costs
    are counted there once, before timing starts)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown program shape {shape!r}; expected one of {SHAPES}")
    for chain in chains:
        mesh, client = chain.vslice.mesh, chain.vslice.client
        if shape == "fused":
            chain.run = client.jit(make_fused(mesh, n, length), chain.vslice, in_specs=SPEC,
                                   out_specs=SPEC, name=f"fused{length}_n{n}").lower(chain.x)
            continue
        step = client.jit(make_step(mesh, n), chain.vslice, in_specs=SPEC, out_specs=SPEC,
                          name=f"step_n{n}").lower(chain.x)
        if shape == "opbyop":
            chain.run = step
        else:
            def chained(x, step=step):
                for _ in range(length):
                    x = step(x)
                return x
            chain.run = client.program(chained, name=f"chain{length}_n{n}")
    # Everything queued so far (the loads) is done once a trivial call after it is.
    for chain in chains:
        chain.x = chain.vslice.client.jit(lambda v: v, chain.vslice, in_specs=SPEC,
                                          out_specs=SPEC, name="warmup")(chain.x)
    fetch_all(chains, time.monotonic() + 600)
    return (1 if shape == "opbyop" else length), (length if shape == "fused" else 1)


@dataclasses.dataclass
class Submission:
    """One unit submitted: its island, when, and its output (sequence and ticket)."""

    island: int
    submitted: float
    output: object
    ticket: object


def drive(chains: Sequence[Chain], seconds: float, outstanding: int, deadline: float,
          most: int = 1 << 30) -> tuple[list[Submission], PathwaysError | None]:
    """Submits units round-robin over the islands for `seconds` (at most `outstanding` per
    island not yet ordered by the controller, so the backlog left when submission stops is
    bounded; at most `most` per island in all), then waits for the last unit of every island
    until `deadline` (time.monotonic()) at the latest. Returns the submissions and the error that
    cut the wait short, if any."""
    submissions: list[Submission] = []
    waiting = {chain.island: collections.deque() for chain in chains}
    stop = time.monotonic() + seconds
    while time.monotonic() < stop and len(submissions) < most * len(chains):
        for chain in chains:
            queue = waiting[chain.island]
            while queue and queue[0].done.is_set():
                queue.popleft()
            if len(queue) >= outstanding:
                queue[0].done.wait(max(0.0, min(stop, deadline) - time.monotonic()))
                continue
            now = time.time()
            chain.x = chain.run(chain.x)
            ticket = chain.x._ticket
            queue.append(ticket)
            submissions.append(Submission(chain.island, now, chain.x, ticket))
    try:
        fetch_all(chains, deadline)
    except PathwaysError as exc:
        return submissions, exc
    return submissions, None


def probe(chains: Sequence[Chain], rounds: int, deadline: float, *, alone: bool = False,
          unit_s: float = 0.0) -> tuple[list[Submission], PathwaysError | None]:
    """Dispatch latency without a backlog: `rounds` times, one unit on every island at once,
    then a wait until they are all done (until `deadline`, time.monotonic(), at the latest).
    With `alone`, one unit in the whole cluster at a time instead, island after island (each
    round a unit per island, waited for before the next).

    The wait reads the units' results only once the controller has ordered them and their own
    device time (`unit_s`) has passed: a read asks each host of the slice (64 GetArray calls
    for a 64-host island), and made at once it lands on the simulated processes while the
    order is still on its way down the island's tree, delaying the very receipt measured (at
    1,024 hosts, one command alone: p99 15 ms with the reads at once, 4 ms without them, from
    the order to the last host's receipt)."""
    submissions: list[Submission] = []
    groups = [[chain] for chain in chains] if alone else [list(chains)]
    for _ in range(rounds):
        for group in groups:
            for chain in group:
                now = time.time()
                chain.x = chain.run(chain.x)
                submissions.append(Submission(chain.island, now, chain.x, chain.x._ticket))
            try:
                for submitted in submissions[-len(group):]:  # ordered (or rejected: the
                    if submitted.ticket is not None:  # read says why)
                        submitted.ticket.done.wait(max(0.0, deadline - time.monotonic()))
                time.sleep(min(unit_s, max(0.0, deadline - time.monotonic())))
                fetch_all(group, deadline)
            except PathwaysError as exc:
                return submissions, exc
    return submissions, None


def fetch_all(chains: Sequence[Chain], deadline: float) -> None:
    """Waits for every chain's current value, each client's in one fetch, until `deadline`
    (time.monotonic()) at the latest."""
    by_client: dict[int, list[Chain]] = {}
    for chain in chains:
        by_client.setdefault(id(chain.vslice.client), []).append(chain)
    for group in by_client.values():
        group[0].vslice.client.fetch([chain.x for chain in group],
                                     timeout=max(0.0, deadline - time.monotonic()))


def probe_latencies(chains: Sequence[Chain], rounds: int, deadline: float, credentials, *,
                    alone: bool = False, unit_s: float = 0.0
                    ) -> tuple[dict | None, PathwaysError | None]:
    """`probe`, then its per-stage latencies from the hosts' timelines
    (benchmarks.scale_measure.latencies; None if nothing was submitted), and the probe's error.
    The probe of `pathways bench scale` (both ways) and `pathways bench dispatch`."""
    from benchmarks.scale_measure import latencies, read_timelines

    probed, error = probe(chains, rounds, deadline, alone=alone, unit_s=unit_s)
    if not probed:
        return None, error
    timelines = read_timelines({c.island: c.addresses for c in chains}, credentials,
                               min(s.submitted for s in probed))
    return latencies(probed, timelines), error


def outstanding_units(duration_s: float, per_unit: int, backlog_s: float = 1.0,
                      most: int = 512) -> int:
    """Units each island may have waiting to be ordered: about `backlog_s` of device work. A
    client's Execute RPC is answered once all its commands are ordered, by the island's window,
    and its next waits for that answer: the island needs that much queued at the controller
    meanwhile (with 0.2 s, eight 64-host islands at 30 ms computations driven by one client got
    their batches 0.2-0.4 s apart and idled between them)."""
    return max(2, min(most, math.ceil(backlog_s / max(duration_s * per_unit, 1e-9))))


def initial_chains(clients: Sequence, devices_per_island: int) -> list[Chain]:
    """A slice of all its devices on every island, and the chain's first value on it: island i
    is driven by `clients[i]` (one client may be given several times)."""
    chains = []
    for island, client in enumerate(clients):
        vslice = client.slice({AXIS: devices_per_island}, island=island)
        x = client.put(np.zeros(devices_per_island, np.float32), vslice, SPEC)
        chains.append(Chain(island, vslice, x, addresses=list(vslice.info.host_addresses)))
    return chains
