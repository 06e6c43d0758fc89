"""Averaging gradients across N pods so that every pod ends with the same bits.

PaLM's pods exchange gradients over the data-centre network and each applies the same update, so
the parameters must stay bitwise identical without ever being compared (Chowdhery et al. 2022,
Section 4). Floating-point addition is not associative: the pods must not merely add the same
numbers, they must add them in the same order, or receive the finished sum.

`butterfly` plans a recursive-doubling all-reduce (a hypercube tree): with P the largest power of
two <= N, pods P..N-1 first fold their gradients into pods 0..N-P-1; then for each of log2 P rounds,
pod i and pod i XOR 2^k swap partial sums and both compute add(partial of the lower pod, partial of
the upper pod). Both partners hold identical inputs (by induction from the previous round) and run
the same program on same-shaped meshes with the arguments in the same order, so they compute the
same bits. Each folded-in pod finally receives both operands of its partner's last addition and
adds them itself. The last addition is fused into the optimizer step (component B), which takes two
gradient trees and averages them with 1/N; with two pods that is exactly PaLM's scheme (one
exchange, B(g_0, g_1) on both), with one pod B(g, g) = g.

Cost: ceil(log2 N) rounds of whole-gradient transfers (plus one to fold in and one to hand back
when N is not a power of two), N log2 N transfers in all rather than the N (N - 1) of sending
every pod's gradients everywhere. Each round's transfers run at the same time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

Tree = TypeVar("Tree")


@dataclasses.dataclass(frozen=True)
class Add:
    """`pod` replaces its partial sum by add(partial of `lower`, partial of `upper`)."""

    pod: int
    lower: int
    upper: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rounds of additions (all of a round read the partials from before it), then the operand
    pairs each pod passes to component B."""

    pods: int
    rounds: tuple[tuple[Add, ...], ...]
    final: tuple[tuple[int, int], ...]  # per pod: (lower, upper) whose partials B adds

    @property
    def transfers(self) -> int:
        """Whole-gradient copies between pods, additions and the final operands together."""
        moved = sum((a.lower != a.pod) + (a.upper != a.pod) for r in self.rounds for a in r)
        return moved + sum((lo != pod) + (hi != pod) for pod, (lo, hi) in enumerate(self.final))


def butterfly(pods: int) -> Plan:
    """The recursive-doubling plan for `pods` >= 1 pods (see the module docstring)."""
    if pods < 1:
        raise ValueError(f"need at least one pod, got {pods}")
    power = 1 << (pods.bit_length() - 1)
    rounds: list[tuple[Add, ...]] = []
    if pods > power:
        rounds.append(tuple(Add(e - power, e - power, e) for e in range(power, pods)))
    levels = power.bit_length() - 1
    for k in range(levels - 1):  # the last level is fused into B
        rounds.append(tuple(Add(i, min(i, i ^ (1 << k)), max(i, i ^ (1 << k)))
                            for i in range(power)))
    if levels == 0:
        final = [(0, 0)]  # one pod: B(g, g)
    else:
        bit = 1 << (levels - 1)
        final = [(min(i, i ^ bit), max(i, i ^ bit)) for i in range(power)]
    final += [final[e - power] for e in range(power, pods)]
    return Plan(pods, tuple(rounds), tuple(final))


def run_plan(plan: Plan, grads: list[Tree], move: Callable[[Tree, int], Tree],
             add: Callable[[int, Tree, Tree], Tree]) -> list[tuple[Tree, Tree]]:
    """Executes `plan` on per-pod gradient trees; returns each pod's (lower, upper) operands of B.

    `move(tree, pod)` copies a tree onto pod `pod`; `add(pod, a, b)` adds two trees on `pod`. With
    the runtime these are a transfer and a compiled function, and the whole exchange is traced into
    one program; with NumPy they let a test replay the arithmetic.
    """
    if len(grads) != plan.pods:
        raise ValueError(f"plan for {plan.pods} pods, got {len(grads)} gradient trees")
    partials: list[Any] = list(grads)

    def on(pod: int, source: int) -> Tree:
        return partials[source] if source == pod else move(partials[source], pod)

    for round_ in plan.rounds:
        updated = list(partials)
        for a in round_:
            updated[a.pod] = add(a.pod, on(a.pod, a.lower), on(a.pod, a.upper))
        partials = updated
    return [(on(pod, lo), on(pod, hi)) for pod, (lo, hi) in enumerate(plan.final)]
