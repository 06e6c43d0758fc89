"""The systems `pathways bench utilization` compares, each kept up for the whole run so they can
take turns, round after round, on the same machine:

- `InProcessTraining`: the training step (components A and B on the whole global batch) jitted in
  the benchmark's process on all the devices;
- `RuntimeTraining`: PaLM's two-pod scheme through a controller and worker processes
  (`model.pods.PodTrainer`), on one island holding all the devices or on several.

`run(warmup, steps)` trains `warmup` steps labelled warm-up, then `steps` measured ones, and says
how fast the measured ones went (`Turn`). Both kinds time their steps alike: a step ends when its
update is done, each step is submitted before the previous one's loss is read (the devices never
wait for the benchmark), and the measured steps run from the end of the last warm-up step (of the
turn's first step when there is no warm-up) to the end of the last.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import utilization_timeline as tl


@dataclasses.dataclass
class Turn:
    """One system's turn: `step_seconds` per step (the first `warmup_steps` are warm-up, not
    measured), tokens/s of the measured ones; for the runtime the device-clock `window` they span,
    each host's busy accounting in it, and the hosts' timelines."""

    tokens_per_s: float
    step_seconds: list[float]
    warmup_steps: int
    losses: list[float]
    window: tuple[float, float] | None = None
    busy: list[tl.Busy] = dataclasses.field(default_factory=list)
    timelines: list[tl.HostTimeline] = dataclasses.field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The JSON form (timelines left out)."""
        steps = [{"step": i, "seconds": s, "warmup": i < self.warmup_steps}
                 for i, s in enumerate(self.step_seconds)]
        record = {"tokens_per_s": self.tokens_per_s, "steps": steps, "losses": self.losses}
        if self.busy:
            record["device_busy"] = float(np.mean([b.utilization for b in self.busy]))
            record["device_busy_per_host"] = {f"{b.island}.{b.host}": b.utilization
                                              for b in self.busy}
            record["idle_attribution_s"] = {f"{b.island}.{b.host}": {
                "dispatch": b.idle_dispatch_s, "host_work": b.idle_host_s,
                "inputs_or_transfer": b.idle_inputs_s, "window": b.window_s} for b in self.busy}
        return record


def inprocess_step(config, settings, devices, abstract: bool = False):
    """(jitted A+B step on one mesh of `devices`, params, opt_state, batch sharding); with
    `abstract`, params and opt_state are ShapeDtypeStructs (for lowering only)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from model.palm import init_params, param_partition_specs
    from model.sharding import make_mesh
    from model.training import init_opt_state, train_step

    mesh = make_mesh((len(devices), 1), ("fsdp", "model"), devices)
    specs = param_partition_specs(config, mesh)
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda s: isinstance(s, P))
    state_sh = (named, {"momentum": named, "second_moment": named})
    batch_sh = NamedSharding(mesh, P("fsdp"))
    rep = NamedSharding(mesh, P())

    def step(params, opt_state, batch, i):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            params, opt_state, loss = train_step(params, opt_state, batch, i, config)
        return params, opt_state, loss

    jitted = jax.jit(step, in_shardings=(*state_sh, batch_sh, rep),
                     out_shardings=(*state_sh, rep), donate_argnums=(0, 1))
    init = jax.jit(lambda k: init_params(config, k), out_shardings=named)
    if abstract:
        params = init.eval_shape(jax.random.key(settings.seed))
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params, named)
        opt_state = {k: params for k in ("momentum", "second_moment")}
        opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32,
                                                                sharding=a.sharding), opt_state)
        return jitted, params, opt_state, batch_sh
    params = init(jax.random.key(settings.seed))
    opt_state = jax.device_put(init_opt_state(params, config), state_sh[1])
    return jitted, params, opt_state, batch_sh


def xla_flops_per_step(config, settings, devices) -> float:
    """XLA's FLOP count of the training step (HLO cost analysis of the lowered step, nothing
    allocated). The layer scan is unrolled for it: XLA counts a loop body once whatever the trip
    count."""
    import jax

    jitted, params, opt_state, batch_sh = inprocess_step(
        config.replace(unroll_layers=True), settings, devices, abstract=True)
    batch = {k: jax.ShapeDtypeStruct((settings.global_batch, config.seq_len), np.int32,
                                     sharding=batch_sh) for k in ("inputs", "targets")}
    cost = jitted.lower(params, opt_state, batch, np.int32(0)).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


class InProcessTraining:
    """The step jitted in this process on all `devices`; compiled on creation."""

    key, label = "inprocess", "in-process JAX"

    def __init__(self, settings, devices) -> None:
        import jax

        from model.pods import global_batch

        self._settings, self._global_batch = settings, global_batch
        jitted, self._params, self._opt_state, self._batch_sh = inprocess_step(
            settings.config, settings, devices)
        first = jax.device_put(global_batch(settings, 0), self._batch_sh)
        self._compiled = jitted.lower(self._params, self._opt_state, first, np.int32(0)).compile()
        self._step = 0

    def run(self, warmup: int, steps: int, on_step: Callable[[], None] = lambda: None) -> Turn:
        import jax

        batches = [jax.device_put(self._global_batch(self._settings, self._step + i),
                                  self._batch_sh) for i in range(warmup + steps)]
        losses: list[float] = []
        ends: list[float] = []
        pending = None

        def finish(loss) -> None:
            losses.append(float(loss))  # waits for that step's update
            ends.append(time.perf_counter())
            on_step()

        start = time.perf_counter()
        for batch in batches:
            self._params, self._opt_state, loss = self._compiled(
                self._params, self._opt_state, batch, np.int32(self._step))
            self._step += 1
            if pending is not None:
                finish(pending)  # the previous step, while this one is queued behind it
            pending = loss
        if pending is not None:
            finish(pending)
        seconds = [b - a for a, b in zip([start, *ends], ends)]
        first = max(warmup - 1, 0)
        measured = len(ends) - 1 - first
        tokens = self._settings.global_batch * self._settings.config.seq_len
        rate = tokens * measured / (ends[-1] - ends[first]) if measured > 0 else 0.0
        return Turn(rate, seconds, warmup, losses)

    def close(self) -> None:
        self._params = self._opt_state = self._compiled = None


class RuntimeTraining:
    """PodTrainer on a ProcessCluster of `islands` islands x `devices_per_island` devices, its
    workers logging to `worker_log`. `timeout_s` is the client's RPC deadline (`scale_deadlines`
    sets it from the measured step time)."""

    def __init__(self, key: str, label: str, settings, islands: int, devices_per_island: int,
                 platform: str, *, worker_log: str, timeout_s: float,
                 worker_metrics_port: int | None = None) -> None:
        import runtime
        from model.pods import PodTrainer, TrainSettings

        self.key, self.label = key, label
        self._settings = TrainSettings(settings.config, settings.global_batch, islands,
                                       (devices_per_island, 1), settings.seed)
        self._cluster = runtime.ProcessCluster(islands, 1, devices_per_island, platform=platform,
                                               worker_log=worker_log, startup_timeout=300,
                                               worker_metrics_port=worker_metrics_port)
        try:
            self.client = runtime.Client(self._cluster.address, name=f"bench-{key}",
                                         timeout_s=timeout_s)
            self._trainer = PodTrainer(self.client, self._settings)
            self._trainer.initialize()
        except BaseException:
            self._cluster.close()
            raise
        self.timeline_timeout_s = timeout_s

    def scale_deadlines(self, timeout_s: float) -> None:
        """Deadlines of this system's RPCs and timeline reads, from the measured step time."""
        self.client.timeout_s = self.timeline_timeout_s = timeout_s

    def run(self, warmup: int, steps: int, on_step: Callable[[Any], None] = lambda r: None
            ) -> Turn:
        since = time.time()
        losses: list[float] = []

        def record(result) -> None:
            losses.append(result.loss)
            on_step(result)

        self._trainer.run(warmup + steps, on_step=record)
        # A step ends when component B ends on the first host (device clock, not the client's,
        # which reads losses a step behind). A host records an execution once it has finished,
        # which can be a moment after its outputs could be read: wait for the last one.
        deadline = time.monotonic() + self.timeline_timeout_s
        while True:
            timelines = self._timelines(since)
            ends = sorted(e.end for e in timelines[0].events if e.name == "component_b")
            if len(ends) >= warmup + steps or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(ends) != warmup + steps:
            raise RuntimeError(f"{self.label}: the first host's timeline holds {len(ends)} "
                               f"steps of the {warmup + steps} run")
        seconds = [ends[0] - since] + [b - a for a, b in zip(ends, ends[1:])]
        first = max(warmup - 1, 0)  # the measured steps run from the end of this one
        measured = len(ends) - 1 - first
        if measured < 1:
            return Turn(0.0, seconds, warmup, losses, timelines=timelines)
        t0, t1 = ends[first], ends[-1]
        tokens = self._settings.global_batch * self._settings.config.seq_len
        return Turn(tokens * measured / (t1 - t0), seconds, warmup, losses, (t0, t1),
                    [tl.host_busy(t, t0, t1) for t in timelines], timelines)

    def _timelines(self, since: float) -> list[tl.HostTimeline]:
        """Every host's executions that ended after `since`, island by island."""
        from proto import pathways_pb2 as pb

        timelines = []
        for h in self.client.status().hosts:
            reply = self.client.worker_stub(h.address).GetTimeline(
                pb.GetTimelineRequest(since=since), timeout=self.timeline_timeout_s)
            timelines.append(tl.HostTimeline(reply.island, reply.host, tuple(reply.events)))
        return sorted(timelines, key=lambda t: (t.island, t.host))

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self._cluster.close()
