"""PaLM's two-pod training scheme, run through the controller (Chowdhery et al. 2022, Section 4).

Each island (pod) holds a full replica of the parameters and optimizer state, sharded over its own
(data, model) mesh. One training step is one program run:

    component A, on every island:   loss_i, g_i = grads_fn(params_i, half batch_i)
    gradient exchange:              g_i moves host to host to every other island
    component B, on every island:   params_i, opt_i = apply_update(params_i, opt_i, g_0, g_1, step)

B takes the gradients in island order on every island, so the islands compute bitwise-identical
parameters. With one island, B gets (g, g) for the whole batch: the same update as plain training.
Batches come from the shipped corpus; batch n depends only on (seed, n), so resuming from a
checkpoint continues the same loss trajectory.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model import checkpoint
from model.config import PalmConfig
from model.dataset import corpus_tokens, sample_batch, split_batch
from model.palm import init_params, param_partition_specs
from model.training import apply_update, grads_fn, init_opt_state

AXES = ("data", "model")
#: Deadline for reading a step's results: the first step includes compiling A and B on the hosts.
STEP_TIMEOUT_S = 900.0
BATCH_SPEC = P("data")
#: Steps whose batches are on their way to the hosts before the step is submitted.
BATCHES_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How to train: the model, the global batch, the islands and their meshes."""

    config: PalmConfig
    global_batch: int = 8
    islands: int = 2
    mesh_shape: tuple[int, int] = (2, 1)  # (data, model) devices per island
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step reports (the loss arrives one step late: fetching it never stalls dispatch)."""

    step: int
    loss: float
    tokens: int
    seconds: float


def global_batch(settings: TrainSettings, step: int) -> dict[str, np.ndarray]:
    """The global batch of training step `step` (a pure function of seed and step)."""
    rng = np.random.default_rng([settings.seed, step])
    return sample_batch(corpus_tokens(), settings.global_batch, settings.config.seq_len, rng)


class PodTrainer:
    """Trains PaLM on `settings.islands` islands of a runtime cluster, one program run per step."""

    def __init__(self, client, settings: TrainSettings, *, islands: Sequence[int] | None = None):
        if settings.global_batch % settings.islands:
            raise ValueError(f"global batch {settings.global_batch} does not split over "
                             f"{settings.islands} islands")
        self.client, self.settings = client, settings
        config = settings.config
        chosen = list(islands) if islands is not None else list(range(settings.islands))
        self.slices = [client.slice(settings.mesh_shape, AXES, island=i) for i in chosen]
        mesh = self.slices[0].mesh
        self.param_specs = param_partition_specs(config, mesh)
        self.opt_specs = {"momentum": self.param_specs, "second_moment": self.param_specs}
        specs = (self.param_specs, self.opt_specs, P())

        def init(seed):
            params = init_params(config, jax.random.key(seed))
            return params, init_opt_state(params, config), jnp.zeros((), jnp.int32)

        def component_a(params, batch):
            return grads_fn(params, batch, config)

        def component_b(params, opt_state, grads_0, grads_1, step):
            params, opt_state = apply_update(params, opt_state, grads_0, grads_1, step, config)
            return params, opt_state, step + 1

        self._init = [client.jit(init, s, out_specs=specs, name="init") for s in self.slices]
        self._a = [client.jit(component_a, s, in_specs=(self.param_specs, BATCH_SPEC),
                              out_specs=(P(), self.param_specs), name="component_a")
                   for s in self.slices]
        self._b = [client.jit(component_b, s, in_specs=(*specs[:2], self.param_specs,
                                                        self.param_specs, P()),
                              out_specs=specs, donate_argnums=(0, 1), name="component_b")
                   for s in self.slices]
        self._step_program = client.program(self._step, name="palm_step")
        self.states: list[tuple] = []
        self.step = 0

    def _step(self, states, batches):
        """One training step over every island (traced once into a program)."""
        outs = [a(state[0], batch) for a, state, batch in zip(self._a, states, batches)]
        losses, grads = [o[0] for o in outs], [o[1] for o in outs]
        # Move every island's gradients to every other island right after component A, so the
        # transfers overlap and no island's update waits on another's.
        moved = [[g if j == i else self.client.transfer(g, s, self.param_specs)
                  for j, g in enumerate(grads)]
                 for i, s in enumerate(self.slices)]
        new_states = []
        for i, (b, state) in enumerate(zip(self._b, states)):
            g = moved[i]
            g0, g1 = (g[0], g[1]) if len(g) == 2 else (g[0], g[0])
            new_states.append(b(state[0], state[1], g0, g1, state[2]))
        return new_states, losses

    def initialize(self) -> None:
        """Fresh parameters, identical on every island (same seed, same program)."""
        seed = np.int32(self.settings.seed)
        self.states = [init(self.client.put(seed, s)) for init, s in zip(self._init, self.slices)]
        self.step = 0

    def _put_batch(self, step: int) -> list[dict]:
        halves = split_batch(global_batch(self.settings, step), len(self.slices))
        return [self.client.put(h, s, BATCH_SPEC) for h, s in zip(halves, self.slices)]

    def run(self, steps: int, *, on_step: Callable[[StepResult], None] = lambda r: None,
            checkpoint_dir: str | None = None, checkpoint_every: int = 0) -> list[StepResult]:
        """Trains `steps` more steps; returns one result per step (loss averaged over islands),
        once every island has applied the last update.

        Dispatch runs ahead: step n+1 is submitted before step n's loss is read back, so the
        hosts never wait for the client. Batches are sent BATCHES_AHEAD steps ahead on another
        thread: a put returns once the hosts hold the data, which on busy devices is after the
        running step, and must hold up neither the next submission nor the loss report. A
        step's seconds run from the previous step's loss to its own.
        """
        if not self.states:
            raise RuntimeError("call initialize() or restore() first")
        tokens = self.settings.global_batch * self.settings.config.seq_len
        results: list[StepResult] = []
        pending: tuple[int, list] | None = None
        last = time.perf_counter()
        with futures.ThreadPoolExecutor(1, thread_name_prefix="batches") as sender:
            ahead = collections.deque(sender.submit(self._put_batch, self.step + i)
                                      for i in range(BATCHES_AHEAD))
            for _ in range(steps):
                batches = ahead.popleft().result(timeout=STEP_TIMEOUT_S)
                self.states, losses = self._step_program(self.states, batches)
                step = self.step
                self.step += 1
                ahead.append(sender.submit(self._put_batch, self.step + BATCHES_AHEAD - 1))
                if checkpoint_dir and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save(checkpoint_dir)
                if pending is not None:
                    results.append(self._report(*pending, last, tokens))
                    last = time.perf_counter()
                    on_step(results[-1])
                pending = (step, losses)
            if pending is not None:
                results.append(self._report(*pending, last, tokens))
                on_step(results[-1])
            for put in ahead:
                put.result(timeout=STEP_TIMEOUT_S)  # surfaces a failed put
        # Returns once the last update has run on every island: nothing is left in flight.
        self.client.fetch([state[2] for state in self.states], timeout=STEP_TIMEOUT_S)
        return results

    def _report(self, step: int, losses: list, since: float, tokens: int) -> StepResult:
        values = self.client.fetch(losses, timeout=STEP_TIMEOUT_S)
        return StepResult(step, float(np.mean(values)), tokens, time.perf_counter() - since)

    def fetch_state(self, island_index: int = 0) -> tuple[Any, Any, int]:
        """(params, opt_state, step) of one island, as NumPy."""
        params, opt_state, step = self.client.fetch(self.states[island_index],
                                                    timeout=STEP_TIMEOUT_S)
        return params, opt_state, int(step)

    def save(self, directory: str) -> str:
        """Writes a checkpoint of island 0's state (every island holds the same)."""
        params, opt_state, step = self.fetch_state(0)
        meta = {"config": self.settings.config.name, "seed": self.settings.seed,
                "global_batch": self.settings.global_batch}
        return str(checkpoint.save(directory, step, {"params": params, "opt_state": opt_state},
                                   meta))

    def restore(self, directory: str) -> int:
        """Loads the newest checkpoint under `directory` onto every island; returns its step."""
        folder = checkpoint.latest(directory)
        if folder is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        like = jax.eval_shape(lambda: self._abstract_state())
        tree, meta = checkpoint.load(folder, like)
        step = int(meta["step"])
        self.states = []
        for s in self.slices:
            params, opt_state = self.client.put(
                (tree["params"], tree["opt_state"]), s, (self.param_specs, self.opt_specs))
            self.states.append((params, opt_state, self.client.put(np.int32(step), s)))
        self.step = step
        return step

    def _abstract_state(self) -> dict:
        params = init_params(self.settings.config, jax.random.key(0))
        return {"params": params, "opt_state": init_opt_state(params, self.settings.config)}


def batches_of(settings: TrainSettings, start: int) -> Iterator[dict[str, np.ndarray]]:
    """Global batches from step `start` on (for reference training in one process)."""
    step = start
    while True:
        yield global_batch(settings, step)
        step += 1
