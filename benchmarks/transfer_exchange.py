"""The two-pod step's gradient exchange, measured: how much of a step the island-to-island copy of
its gradients adds when the copy is issued behind the step's other computations.

Island 0 computes a gradient-sized array (`make`, elementwise), then a computation with
collectives that holds the island's order for about `step_s` seconds (`busy`: a loop of sharded
matmuls, calibrated on the cluster), then the gradient is copied to island 1 (issued last, as a
training loop issues it). The step is over when both the copy and `busy` are done. Each round
times, back to back: the computations alone (`compute_s`), the copy alone of an array already
computed (`copy_s`), and the step (`step_s`). The exchange's share of the step is
(step_s - compute_s) / step_s: 0 when the copy hides entirely behind `busy`, and
copy_s / (compute_s + copy_s) when it waits for it (the copy in the island's order, behind
`busy`: PATHWAYS_EARLY_SENDS=0).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.environment import spread

MIB = 1 << 20
SIDE = 512  # of `busy`'s matrices


class Exchange:
    """The measurement on one cluster (benchmarks.transfer.Bench: its client and two slices)."""

    def __init__(self, bench, gradient_mib: float, step_s: float,
                 iterations: int | None = None) -> None:
        """Puts the inputs and compiles; `busy` runs `iterations` matmul rounds (None: as many
        as take about `step_s` seconds here)."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        from benchmarks.transfer import wait_ready

        self.bench, self._wait = bench, wait_ready
        client, s0 = bench.client, bench.slices[0]
        devices = len(s0.info.devices)
        self.x = client.put(np.ones(int(gradient_mib * MIB) // 4, np.float32), s0, P("x"))
        self.m = client.put(np.eye(SIDE * devices, SIDE, dtype=np.float32), s0, P("x"))
        self.make = client.jit(lambda v: v * 2, s0, in_specs=P("x"), out_specs=P("x"))

        def busy_of(n):
            def busy(m):
                return jax.lax.fori_loop(0, n, lambda i, a: jnp.tanh(a @ a.T @ a) * 0.5, m)
            return client.jit(busy, s0, in_specs=P("x"), out_specs=P("x"))
        if iterations is None:
            probe = busy_of(8)
            self._ready(probe(self.m))  # compiled
            began = time.perf_counter()
            self._ready(probe(self.m))
            per_iteration = max((time.perf_counter() - began) / 8, 1e-4)
            iterations = max(1, int(step_s / per_iteration))
        self.iterations = iterations
        self.busy = busy_of(self.iterations)
        self._ready(self.busy(self.m))
        self._ready(self.make(self.x).to(bench.slices[1]))  # compiled, segments warm

    def _ready(self, *arrays) -> None:
        for array in arrays:
            self._wait(self.bench.client, array)

    def round(self) -> dict[str, float]:
        """One round: seconds of the computations alone, the copy alone, and the step."""
        target = self.bench.slices[1]
        began = time.perf_counter()
        grad, held = self.make(self.x), self.busy(self.m)
        self._ready(held, grad)
        compute_s = time.perf_counter() - began
        began = time.perf_counter()
        moved = grad.to(target)
        self._ready(moved)
        copy_s = time.perf_counter() - began
        moved.delete(), grad.delete(), held.delete()
        began = time.perf_counter()
        grad, held = self.make(self.x), self.busy(self.m)
        moved = grad.to(target)  # issued behind `busy`
        self._ready(held, moved)
        step_s = time.perf_counter() - began
        moved.delete(), grad.delete(), held.delete()
        return {"compute_s": compute_s, "copy_s": copy_s, "step_s": step_s,
                "share_of_step": max(0.0, step_s - compute_s) / step_s,
                "serial_share": copy_s / (compute_s + copy_s)}


def summarize(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Median and spread of each figure over the rounds."""
    return {key: spread([r[key] for r in rounds]) for key in rounds[0]} if rounds else {}
