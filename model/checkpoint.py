"""Training checkpoints with Orbax: sharded, asynchronous, a bounded number kept, restorable onto
any mesh, and tied to the config that wrote them.

Layout of a checkpoint directory DIR:
    DIR/run.json            the config (and seed) of the run that owns DIR; another config is refused
    DIR/step_<K>/state      parameters and optimizer state after K updates (Orbax, OCDBT/zarr: one
                            chunk per shard of the mesh the arrays were saved from)
    DIR/step_<K>/meta       JSON: step, seed, skipped batches, the mesh and pods it was written from

Who writes: the arrays live on the pods' worker hosts, and the runtime offers no instruction that
makes a worker write its shards to storage (adding one means a new instruction kind in the gang
order, which the runtime does not have yet). So the client writes: it fetches one pod's state (each
host streams only its own shards, in parallel), lays it out again as jax.Arrays sharded like the
pod's mesh over the client's own devices, and Orbax writes each shard as its own chunk from a
background thread while training goes on. Restoring reads the chunks for whatever mesh the new run
has, and the trainer puts the state onto its pods with their shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from model.config import PalmConfig
from model.optimizer import AdafactorConfig
from model.partitioning import PodMesh

RUN_FILE = "run.json"
STEP_PREFIX = "step"
#: Fields that change how a config runs but not what its checkpoints hold.
_LAYOUT_FIELDS = ("name", "remat", "unroll_layers", "logical_axis_rules")


class CheckpointMismatchError(ValueError):
    """The directory holds checkpoints of another run (another config or seed)."""


def config_to_json(config: PalmConfig) -> dict[str, Any]:
    """The config as JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_json(data: dict[str, Any]) -> PalmConfig:
    """Rebuilds a config written by `config_to_json`."""
    fields = dict(data)
    fields["optimizer"] = AdafactorConfig(**fields.get("optimizer", {}))
    fields["batch_ramp"] = tuple(tuple(pair) for pair in fields.get("batch_ramp", ()))
    fields["logical_axis_rules"] = tuple(
        (name, tuple(target) if isinstance(target, list) else target)
        for name, target in fields.get("logical_axis_rules", ()))
    return PalmConfig(**fields)


def _identity(run: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in run["config"].items() if k not in _LAYOUT_FIELDS}
    return {"config": config, "seed": run["seed"]}


def _local_sharding(mesh: PodMesh, spec: PartitionSpec) -> jax.sharding.Sharding:
    """`spec` on a mesh of the client's own devices shaped like `mesh`, or one device when the
    client has too few (then each array is one chunk)."""
    devices = jax.local_devices()
    if len(devices) < mesh.size:
        return SingleDeviceSharding(devices[0])
    return NamedSharding(mesh.concrete(devices[: mesh.size]), spec)


def _is_spec(node: Any) -> bool:
    return isinstance(node, PartitionSpec)


class CheckpointStore:
    """The checkpoints of one run in `directory` (created if missing).

    `config` and `seed` identify the run: a directory whose run.json names another config (layout
    fields such as remat aside) or seed raises CheckpointMismatchError. `keep` bounds how many
    checkpoints stay (the oldest go first; None keeps all). Saves are asynchronous: `save` returns
    once the state is copied, the write goes on in the background, and the next save, `wait` or
    `close` waits for it. A checkpoint appears under its final name only when complete.
    """

    def __init__(self, directory: str | os.PathLike, config: PalmConfig, seed: int, *,
                 keep: int | None = 3) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        run = {"config": config_to_json(config), "seed": seed}
        run_file = self.directory / RUN_FILE
        if run_file.exists():
            written = json.loads(run_file.read_text())
            if _identity(written) != _identity(run):
                raise CheckpointMismatchError(_difference(self.directory, written, run))
        else:
            if any(self.directory.glob(f"{STEP_PREFIX}_*")):
                raise CheckpointMismatchError(f"{self.directory} holds checkpoints without {RUN_FILE}: "
                                              "not written by this trainer")
            run_file.write_text(json.dumps(run, indent=1))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, step_prefix=STEP_PREFIX,
                                               enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))
        self._closed_steps: list[int] | None = None  # what was on disk when closed

    def steps(self) -> list[int]:
        """Steps of the checkpoints, oldest first (after `close`, those complete by then)."""
        if self._closed_steps is not None:
            return list(self._closed_steps)
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def folder(self, step: int) -> pathlib.Path:
        return self.directory / f"{STEP_PREFIX}_{step}"

    def save(self, step: int, state: Any, specs: Any, mesh: PodMesh, meta: dict[str, Any]) -> None:
        """Starts writing `state` (NumPy leaves; `specs` the matching PartitionSpecs on `mesh`) as
        step_<step>; returns before the write is done."""
        arrays = jax.tree.map(lambda value, spec: jax.device_put(value, _local_sharding(mesh, spec)),
                              state, specs, is_leaf=lambda n: isinstance(n, np.ndarray))
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            meta=ocp.args.JsonSave({**meta, "step": step, "mesh": dict(mesh.axes)})))

    def restore(self, step: int, like: Any, specs: Any, mesh: PodMesh) -> tuple[Any, dict[str, Any]]:
        """(state as NumPy, meta) of step_<step>, read for `mesh` with `specs` whatever mesh wrote
        it. `like` gives shapes and dtypes; a mismatch raises ValueError."""
        self.wait()
        target = jax.tree.map(
            lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                    sharding=_local_sharding(mesh, spec)),
            like, specs)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = jax.tree.map(np.asarray, restored.state)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(like)):
            if got.shape != tuple(want.shape) or got.dtype != np.dtype(want.dtype):
                raise ValueError(f"checkpoint step_{step} holds {got.dtype}{list(got.shape)} where "
                                 f"{np.dtype(want.dtype)}{list(want.shape)} was expected")
        return state, dict(restored.meta)

    def wait(self) -> None:
        """Returns once every save started so far is on disk."""
        if self._closed_steps is None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager. Idempotent."""
        if self._closed_steps is None:
            self._manager.close()
            self._closed_steps = sorted(self._manager.all_steps())

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _difference(directory: pathlib.Path, written: dict[str, Any], wanted: dict[str, Any]) -> str:
    old, new = _identity(written), _identity(wanted)
    fields = sorted(k for k in set(old["config"]) | set(new["config"])
                    if old["config"].get(k) != new["config"].get(k))
    changes = [f"{k}: {old['config'].get(k)!r} there, {new['config'].get(k)!r} here" for k in fields]
    if old["seed"] != new["seed"]:
        changes.append(f"seed: {old['seed']} there, {new['seed']} here")
    return (f"{directory} holds checkpoints of another run ({written['config'].get('name')}; "
            f"{'; '.join(changes)}); use another --checkpoint-dir")


def read_run(directory: str | os.PathLike) -> tuple[PalmConfig, int]:
    """(config, seed) of the run that owns a checkpoint directory (FileNotFoundError if none)."""
    run = json.loads((pathlib.Path(directory) / RUN_FILE).read_text())
    return config_from_json(run["config"]), int(run["seed"])


def read_latest(directory: str | os.PathLike) -> tuple[PalmConfig, int, dict[str, Any]]:
    """(config, step, {"params", "opt_state"} as NumPy) of the newest checkpoint of a directory,
    read whole into this process. FileNotFoundError when it holds none."""
    from model.palm import init_params, param_partition_specs
    from model.training import init_opt_state

    config, seed = read_run(directory)

    def abstract() -> dict[str, Any]:
        params = init_params(config, jax.random.key(0))
        return {"params": params, "opt_state": init_opt_state(params, config)}

    one = PodMesh((("fsdp", 1),))
    specs = param_partition_specs(config, one.abstract())
    with CheckpointStore(directory, config, seed, keep=None) as store:
        step = store.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        state, _ = store.restore(step, jax.eval_shape(abstract),
                                 {"params": specs, "opt_state": {"momentum": specs, "second_moment": specs}},
                                 one)
    return config, step, state
