"""PaLM's multi-pod training scheme, run through the controller (Chowdhery et al. 2022, Section 4).

Each island (pod) holds a full replica of the parameters and optimizer state, sharded over its own
2-D mesh (fsdp x model, plus data if asked; model.partitioning). One training step is one program:

    component A, on every pod:   loss_i, g_i = grads_fn(params_i, batch share i)
    gradient exchange:           model.allreduce's plan: pods swap partial sums host to host
    component B, on every pod:   params_i, opt_i = apply_update(params_i, opt_i, lo_i, hi_i, step)

B adds the two operands of the plan's last addition and averages over the pods; the plan makes
those operands bitwise identical on every pod, so the pods compute bitwise-identical parameters.
With one pod, B gets (g, g): the same update as plain training. Step s reads the packed sequences
that model.recipe's schedule assigns it, so a resumed or rewound run reads what an uninterrupted
one would.
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

from model.allreduce import butterfly, run_plan
from model.checkpoint import CheckpointStore
from model.config import PalmConfig
from model.dataset import corpus_documents, packed_sequences, split_batch
from model.flops import flops_per_token
from model.optimizer import learning_rate
from model.palm import init_params, param_partition_specs
from model.partitioning import PodMesh
from model.recipe import DataSchedule, SpikeDetector, SpikePolicy, rewind_target
from model.sharding import logical_to_mesh_spec
from model.training import apply_update, grads_fn, init_opt_state, loss_terms

#: Deadline for reading a step's results: the first step includes compiling A and B on the hosts.
STEP_TIMEOUT_S = 900.0
#: Steps whose batches are on their way to the hosts before the step is submitted.
BATCHES_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How to train: the model, the global batch, the pods and each pod's mesh.

    `global_batch` is the sequences per step when the config has no batch ramp. `mesh_shape`
    and `mesh_axes` name each pod's mesh (default: fsdp x model). `eval_sequences` held-out
    sequences are evaluated by `PodTrainer.evaluate` (0: one global batch's worth).
    """

    config: PalmConfig
    global_batch: int = 8
    islands: int = 2
    mesh_shape: tuple[int, ...] = (2, 1)
    seed: int = 0
    mesh_axes: tuple[str, ...] = ("fsdp", "model")
    eval_sequences: int = 0

    @property
    def mesh(self) -> PodMesh:
        return PodMesh.of(tuple(self.mesh_shape), tuple(self.mesh_axes))

    def schedule(self) -> DataSchedule:
        return DataSchedule(self.global_batch, self.config.batch_ramp)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What one step reports to the training loop's hooks.

    `step` counts the updates applied, this one included: the checkpoint step_<step> holds the
    state after it. The loss is read one step late, so fetching it never stalls dispatch; a step's
    seconds run from the previous step's loss to its own. `mfu` needs the peak FLOP/s per device.
    """

    step: int
    loss: float
    batch_size: int
    tokens: int
    seconds: float
    learning_rate: float
    mfu: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


StepResult = StepInfo  # the name earlier callers use


def global_batch(settings: TrainSettings, step: int, schedule: DataSchedule | None = None
                 ) -> dict[str, np.ndarray]:
    """The global batch of 0-based step `step` (a pure function of seed, schedule and step)."""
    schedule = schedule or settings.schedule()
    train_docs, _ = corpus_documents()
    return packed_sequences(train_docs, settings.config.seq_len, schedule.first_sequence(step),
                            schedule.batch_size(step), settings.seed)


def check_batches(settings: TrainSettings) -> None:
    """Raises ValueError unless every batch size of the schedule splits over the pods and each
    pod's batch axes (data x fsdp)."""
    ways = settings.islands * settings.mesh.batch_ways
    sizes = {settings.global_batch} if not settings.config.batch_ramp else {
        size for _, size in settings.config.batch_ramp}
    bad = sorted(size for size in sizes if size % ways)
    if bad:
        raise ValueError(f"global batch {bad[0]} does not split over {settings.islands} pods x "
                         f"{settings.mesh.batch_ways} batch shards ({settings.mesh}) per pod")


class PodTrainer:
    """Trains PaLM on `settings.islands` islands of a runtime cluster, one program run per step.

    `peak_flops_per_device`, when known, lets each StepInfo carry the step's MFU.
    """

    def __init__(self, client, settings: TrainSettings, *, islands: Sequence[int] | None = None,
                 peak_flops_per_device: float | None = None):
        check_batches(settings)
        self.client, self.settings = client, settings
        self.peak_flops_per_device = peak_flops_per_device
        config = settings.config
        mesh = settings.mesh
        chosen = list(islands) if islands is not None else list(range(settings.islands))
        self.slices = [client.slice(mesh.shape, mesh.names, island=i) for i in chosen]
        abstract = self.slices[0].mesh
        self.param_specs = param_partition_specs(config, abstract)
        self.opt_specs = {"momentum": self.param_specs, "second_moment": self.param_specs}
        self.batch_spec = logical_to_mesh_spec(("batch", "seq"), config.logical_axis_rules, abstract)
        self.plan = butterfly(len(self.slices))
        self.schedule = settings.schedule()
        state_specs = (self.param_specs, self.opt_specs, P())
        pods = len(self.slices)

        def init(seed):
            params = init_params(config, jax.random.key(seed))
            return params, init_opt_state(params, config), jnp.zeros((), jnp.int32)

        def component_a(pod):
            def grads(params, batch, step):
                key = None
                if config.dropout_rate > 0:  # a different mask on every pod and step
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(settings.seed), step), pod)
                return grads_fn(params, batch, config, key)
            return grads

        def add(a, b):
            return jax.tree.map(jnp.add, a, b)

        def component_b(params, opt_state, grads_lo, grads_hi, step):
            params, opt_state = apply_update(params, opt_state, grads_lo, grads_hi, step, config,
                                             parts=pods)
            return params, opt_state, step + 1

        def evaluate(params, batch):
            return loss_terms(params, batch, config)

        jit = client.jit
        self._init = [jit(init, s, out_specs=state_specs, name="init") for s in self.slices]
        self._a = [jit(component_a(i), s, in_specs=(self.param_specs, self.batch_spec, P()),
                       out_specs=(P(), self.param_specs), name="component_a")
                   for i, s in enumerate(self.slices)]
        self._add = [jit(add, s, in_specs=(self.param_specs, self.param_specs),
                         out_specs=self.param_specs, name="gradient_sum") for s in self.slices]
        self._b = [jit(component_b, s, in_specs=(*state_specs[:2], self.param_specs,
                                                 self.param_specs, P()),
                       out_specs=state_specs, donate_argnums=(0, 1), name="component_b")
                   for s in self.slices]
        self._eval = jit(evaluate, self.slices[0], in_specs=(self.param_specs, self.batch_spec),
                         out_specs=P(), name="evaluate")
        self._step_program = client.program(self._step, name="palm_step")
        self._eval_batch = None
        self.states: list[tuple] = []
        self.step = 0

    def _step(self, states, batches):
        """One training step over every pod (traced once per batch size into a program)."""
        outs = [a(state[0], batch, state[2]) for a, state, batch in zip(self._a, states, batches)]
        losses, grads = [o[0] for o in outs], [o[1] for o in outs]
        # Each round's transfers start as soon as component A (or the last addition) has produced
        # their source; no pod's update waits for more than its own operands.
        operands = run_plan(
            self.plan, grads,
            move=lambda tree, pod: self.client.transfer(tree, self.slices[pod], self.param_specs),
            add=lambda pod, a, b: self._add[pod](a, b))
        new_states = [b(state[0], state[1], lo, hi, state[2])
                      for b, state, (lo, hi) in zip(self._b, states, operands)]
        return new_states, losses

    def initialize(self) -> None:
        """Fresh parameters, identical on every pod (same seed, same program)."""
        seed = np.int32(self.settings.seed)
        self.states = [init(self.client.put(seed, s)) for init, s in zip(self._init, self.slices)]
        self.step = 0
        self.schedule = self.settings.schedule()

    def _put_batch(self, step: int, schedule: DataSchedule) -> list[dict]:
        shares = split_batch(global_batch(self.settings, step, schedule), len(self.slices))
        return [self.client.put(h, s, self.batch_spec) for h, s in zip(shares, self.slices)]

    def _info(self, step: int, losses: list, batch_size: int, since: float) -> StepInfo:
        values = self.client.fetch(losses, timeout=STEP_TIMEOUT_S)
        seconds = time.perf_counter() - since
        tokens = batch_size * self.settings.config.seq_len
        mfu = None
        if self.peak_flops_per_device:
            devices = len(self.slices) * self.settings.mesh.size
            mfu = tokens / seconds * flops_per_token(self.settings.config) / (
                self.peak_flops_per_device * devices)
        lr = float(learning_rate(step - 1, self.settings.config.optimizer))
        return StepInfo(step, float(np.mean(values)), batch_size, tokens, seconds, lr, mfu)

    def run(self, steps: int, *, on_step: Callable[[StepInfo], None] | None = None,
            checkpoints: CheckpointStore | None = None, checkpoint_every: int = 0,
            eval_every: int = 0, on_eval: Callable[[int, dict], None] | None = None,
            spikes: SpikePolicy | None = None,
            stop: Callable[[], bool] | None = None) -> list[StepInfo]:
        """Trains until `steps` more updates are applied; returns one StepInfo per step reported
        (a loss spike rewinds to an earlier checkpoint, so steps may repeat). Returns once the
        last update has run on every pod.

        Dispatch runs ahead: step n+1 is submitted before step n's loss is read back, so the
        hosts never wait for the client. Batches are sent BATCHES_AHEAD steps ahead on another
        thread: a put returns once the hosts hold the data, which on busy devices is after the
        running step, and must hold up neither the next submission nor the loss report.
        Every `checkpoint_every` steps the state is saved to `checkpoints` (asynchronously);
        every `eval_every` steps `on_eval(step, evaluate())` is called. With a `spikes` policy
        and checkpoints, a spiking loss restarts from the checkpoint `rewind` steps earlier and
        skips `skip` batches. When `stop()` turns true, no further step is submitted: the run
        returns once the steps in flight are done and reported (self.step is then the last).
        """
        if not self.states:
            raise RuntimeError("call initialize() or restore() first")
        target = self.step + steps
        detector = SpikeDetector(spikes or SpikePolicy(factor=0))
        restarts = 0
        results: list[StepInfo] = []
        with futures.ThreadPoolExecutor(1, thread_name_prefix="batches") as sender:
            ahead: collections.deque = collections.deque()

            def send_ahead(first: int) -> None:
                for step in range(first, min(first + BATCHES_AHEAD, target)):
                    if all(s != step for s, _ in ahead):
                        ahead.append((step, sender.submit(self._put_batch, step, self.schedule)))

            def drain() -> None:
                while ahead:
                    ahead.popleft()[1].result(timeout=STEP_TIMEOUT_S)  # surfaces a failed put

            pending: tuple[int, list, int] | None = None
            last = time.perf_counter()
            while self.step < target or pending is not None:
                if stop is not None and stop():
                    target = self.step
                submitted = None
                if self.step < target:
                    send_ahead(self.step)
                    _, put = ahead.popleft()
                    batches = put.result(timeout=STEP_TIMEOUT_S)
                    self.states, losses = self._step_program(self.states, batches)
                    self.step += 1
                    submitted = (self.step, losses, self.schedule.batch_size(self.step - 1))
                    send_ahead(self.step)
                if pending is not None:
                    info = self._info(*pending, last)
                    last = time.perf_counter()
                    results.append(info)
                    if on_step is not None:
                        on_step(info)
                    if detector.is_spike(info.loss) and checkpoints is not None \
                            and restarts < detector.policy.max_restarts:
                        back = rewind_target(checkpoints.steps(), info.step, detector.policy.rewind)
                        if back is not None:
                            drain()
                            restarts += 1
                            self.restore(checkpoints, back)
                            self.schedule = self.schedule.skipping(back, detector.policy.skip)
                            detector.reset()
                            pending, last = None, time.perf_counter()
                            continue
                pending = submitted
                if submitted is not None:
                    if checkpoints is not None and checkpoint_every and self.step % checkpoint_every == 0:
                        self.save(checkpoints)
                    if eval_every and self.step % eval_every == 0 and on_eval is not None:
                        on_eval(self.step, self.evaluate())
            drain()
        self.client.fetch([state[2] for state in self.states], timeout=STEP_TIMEOUT_S)
        return results

    def evaluate(self) -> dict[str, float]:
        """Held-out loss, cross entropy and perplexity (exp of the cross entropy) of pod 0's
        parameters, over `eval_sequences` packed held-out sequences (the same every time)."""
        if self._eval_batch is None:
            _, held_out = corpus_documents()
            ways = self.settings.mesh.batch_ways
            wanted = self.settings.eval_sequences or self.schedule.batch_size(0)
            batch = packed_sequences(held_out, self.settings.config.seq_len, 0, wanted, seed=-1)
            count = len(batch["inputs"]) // ways * ways
            if count == 0:
                raise ValueError(f"too few held-out sequences for {ways} batch shards")
            self._eval_batch = self.client.put({k: v[:count] for k, v in batch.items()},
                                               self.slices[0], self.batch_spec)
        terms = self.client.fetch(self._eval(self.states[0][0], self._eval_batch),
                                  timeout=STEP_TIMEOUT_S)
        out = {name: float(value) for name, value in terms.items()}
        out["perplexity"] = float(np.exp(out["cross_entropy"]))
        return out

    def fetch_state(self, island_index: int = 0) -> tuple[Any, Any, int]:
        """(params, opt_state, step) of one pod, as NumPy."""
        params, opt_state, step = self.client.fetch(self.states[island_index],
                                                    timeout=STEP_TIMEOUT_S)
        return params, opt_state, int(step)

    def pods_agree(self) -> bool:
        """Whether every pod holds bitwise the same parameters, optimizer state and step (fetches
        every pod's whole state: a check for tests and small runs)."""
        reference = jax.tree.leaves(self.fetch_state(0))
        for pod in range(1, len(self.slices)):
            other = jax.tree.leaves(self.fetch_state(pod))
            if not all(np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
                       for a, b in zip(reference, other, strict=True)):
                return False
        return True

    def _store(self, target: CheckpointStore | str) -> CheckpointStore:
        if isinstance(target, CheckpointStore):
            return target
        return CheckpointStore(target, self.settings.config, self.settings.seed, keep=None)

    def save(self, checkpoints: CheckpointStore | str) -> int:
        """Starts saving pod 0's state (every pod holds the same) as step_<step>; returns the step.
        Given a directory rather than a store, waits for the write."""
        store = self._store(checkpoints)
        params, opt_state, step = self.fetch_state(0)
        meta = {"seed": self.settings.seed, "islands": len(self.slices),
                "skips": self.schedule.as_json()}
        store.save(step, {"params": params, "opt_state": opt_state},
                   {"params": self.param_specs, "opt_state": self.opt_specs}, self.settings.mesh,
                   meta)
        if store is not checkpoints:
            store.close()
        return step

    def restore(self, checkpoints: CheckpointStore | str, step: int | None = None) -> int:
        """Loads a checkpoint (default: the newest) onto every pod, whatever mesh or number of
        pods wrote it; returns its step. FileNotFoundError when there is none."""
        store = self._store(checkpoints)
        try:
            step = store.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {store.directory}")
            like = jax.eval_shape(self._abstract_state)
            specs = {"params": self.param_specs, "opt_state": self.opt_specs}
            tree, meta = store.restore(step, like, specs, self.settings.mesh)
        finally:
            if store is not checkpoints:
                store.close()
        skips = self.settings.schedule().with_skips_from_json(meta.get("skips", []))
        self.set_state(tree["params"], tree["opt_state"], step, skips)
        return step

    def set_state(self, params: Any, opt_state: Any, step: int,
                  schedule: DataSchedule | None = None) -> None:
        """Puts a state (NumPy pytrees, after `step` updates) onto every pod, sharded for this
        trainer's mesh; `schedule` carries the batches skipped so far (default: none)."""
        self.states = []
        for s in self.slices:
            on_pod = self.client.put((params, opt_state), s, (self.param_specs, self.opt_specs))
            self.states.append((*on_pod, self.client.put(np.int32(step), s)))
        self.step = step
        self.schedule = schedule or self.settings.schedule()

    def _abstract_state(self) -> dict:
        params = init_params(self.settings.config, jax.random.key(0))
        return {"params": params, "opt_state": init_opt_state(params, self.settings.config)}


def batches_of(settings: TrainSettings, start: int) -> Iterator[dict[str, np.ndarray]]:
    """Global batches from step `start` on (for reference training in one process)."""
    step = start
    while True:
        yield global_batch(settings, step)
        step += 1
