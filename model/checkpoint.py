"""Checkpoints: a pytree of arrays plus JSON metadata, as msgpack of raw bytes (never pickle).

Layout: DIR/step_<N>/state.msgpack holds {path: {"dtype", "shape", "data"}} for every leaf, and
DIR/step_<N>/meta.json what is needed to continue (config name, step, seed, ...). A checkpoint is
written to a temporary folder and renamed, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import msgpack
import numpy as np

from runtime._wire import dtype_from_name, dtype_name

STATE_FILE = "state.msgpack"
META_FILE = "meta.json"


def _key(path) -> str:
    return jax.tree_util.keystr(path)


def save(directory: str | os.PathLike, step: int, tree: Any, meta: dict[str, Any]) -> pathlib.Path:
    """Writes `tree` (NumPy leaves) and `meta` as DIR/step_<step>; returns that folder."""
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.ascontiguousarray(leaf)
        leaves[_key(path)] = {"dtype": dtype_name(value.dtype), "shape": list(value.shape),
                              "data": value.tobytes()}
    with open(tmp / STATE_FILE, "wb") as f:
        msgpack.pack(leaves, f, use_bin_type=True)
    with open(tmp / META_FILE, "w") as f:
        json.dump({**meta, "step": step}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest(directory: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint folder under DIR (or DIR itself if it is one), or None."""
    root = pathlib.Path(directory)
    if (root / META_FILE).exists():
        return root
    steps = [(int(p.name.split("_", 1)[1]), p) for p in root.glob("step_*")
             if (p / META_FILE).exists() and p.name.split("_", 1)[1].isdigit()]
    return max(steps)[1] if steps else None


def load(folder: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint into the structure of `like`; returns (tree of NumPy arrays, meta).

    Raises ValueError when the checkpoint lacks a leaf of `like` or has another shape or dtype.
    """
    folder = pathlib.Path(folder)
    with open(folder / STATE_FILE, "rb") as f:
        leaves = msgpack.unpack(f, raw=False)
    with open(folder / META_FILE) as f:
        meta = json.load(f)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    values = []
    for path, ref in flat:
        entry = leaves.get(_key(path))
        if entry is None:
            raise ValueError(f"checkpoint {folder} has no {_key(path)}")
        value = np.frombuffer(entry["data"], dtype_from_name(entry["dtype"])).reshape(entry["shape"])
        if value.shape != tuple(ref.shape) or value.dtype != np.dtype(ref.dtype):
            raise ValueError(f"checkpoint {folder}: {_key(path)} is {value.dtype}{list(value.shape)}, "
                             f"expected {np.dtype(ref.dtype)}{list(ref.shape)}")
        values.append(value)
    return jax.tree_util.tree_unflatten(treedef, values), meta
