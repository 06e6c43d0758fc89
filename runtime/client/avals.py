"""Values at the client's boundary, seen as `jax.jit` sees them.

- An argument leaf's abstract value follows JAX: Python scalars are weakly typed (`bf16 * 2.0`
  stays bfloat16), dtypes are canonicalised (float64 is float32 unless x64 is on), and anything
  that is not an array (a string, a big-endian array) is a TypeError naming the argument.
- Typed PRNG keys (`jax.random.key`) have no wire dtype: they travel and live on the hosts as their
  uint32 key data (`jax.random.key_data`, trailing key dimensions unsharded), while the handle keeps
  the key's dtype, which records its implementation. Compiled functions wrap the data back into
  keys on entry and unwrap key outputs on exit; fetches wrap it again on the client.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from proto.errors import InvalidArgumentError


def is_key_dtype(dtype: Any) -> bool:
    """Whether `dtype` is a typed PRNG key dtype (`jax.random.key(...).dtype`)."""
    return (dtype is not None and not isinstance(dtype, np.dtype)
            and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


def logical_dtype(dtype: Any):
    """A NumPy dtype, or the key dtype itself for typed keys."""
    return dtype if is_key_dtype(dtype) else np.dtype(dtype)


@functools.lru_cache(maxsize=256)
def _key_data_layout(shape: tuple[int, ...], dtype) -> tuple[tuple[int, ...], np.dtype]:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
    return tuple(data.shape), np.dtype(data.dtype)


def data_layout(shape: Sequence[int], dtype) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of what the hosts store for an array: the array itself, or a typed key's
    uint32 key data (the key shape followed by the implementation's key dimensions)."""
    if isinstance(dtype, np.dtype):
        return tuple(shape), dtype
    if is_key_dtype(dtype):
        return _key_data_layout(tuple(int(d) for d in shape), dtype)
    return tuple(shape), np.dtype(dtype)


class NotAnArrayError(TypeError):
    """A leaf that JAX cannot treat as an array (raised without the argument's name; callers that
    know it re-raise a TypeError naming it)."""


def abstractify(leaf: Any) -> jax.ShapeDtypeStruct:
    """The abstract value `jax.jit` gives an argument leaf (shape, canonical dtype, weak type).

    Raises NotAnArrayError for a non-array (as `jax.jit` raises TypeError), OverflowError for a
    Python int the canonical integer type cannot hold."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type)
    try:
        aval = jax.typeof(leaf)
    except TypeError as exc:
        raise NotAnArrayError(str(exc)) from None
    if not hasattr(aval, "dtype") or not hasattr(aval, "shape"):
        raise NotAnArrayError(f"{type(leaf).__name__} is not an array type")
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def not_an_array(what: str, leaf: Any, exc: Exception) -> TypeError:
    """The TypeError for a non-array argument, naming it as `jax.jit` does."""
    text = repr(leaf)
    text = text if len(text) <= 60 else text[:57] + "..."
    hint = ""
    if isinstance(leaf, np.ndarray) and not leaf.dtype.isnative:
        hint = "; convert it to native byte order first: x.astype(x.dtype.newbyteorder('='))"
    return TypeError(f"{what} is {text} of type {type(leaf).__name__}, not an array JAX accepts "
                     f"({exc}){hint or '; pass non-array values by closing over them'}")


def host_value(leaf: Any, aval: jax.ShapeDtypeStruct) -> np.ndarray:
    """The bytes a put sends for a leaf with abstract value `aval`: the array in its canonical
    dtype, or a typed key's uint32 key data."""
    if is_key_dtype(aval.dtype):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf).astype(aval.dtype, copy=False)


def from_host_value(data: np.ndarray, dtype) -> Any:
    """A fetched array as JAX would hand it back: NumPy, or the typed key wrapping key data."""
    if is_key_dtype(dtype):
        return jax.random.wrap_key_data(data, dtype=dtype)
    return data


def physical_function(fn: Callable[..., Sequence], in_dtypes: Sequence) -> Callable[..., tuple]:
    """`fn` over key data instead of typed keys: inputs whose logical dtype (in `in_dtypes`) is a
    key dtype are wrapped on entry; key outputs are unwrapped on exit."""

    def over_data(*leaves):
        wrapped = [jax.random.wrap_key_data(x, dtype=d) if is_key_dtype(d) else x
                   for x, d in zip(leaves, in_dtypes)]
        return tuple(jax.random.key_data(o) if is_key_dtype(getattr(o, "dtype", None)) else o
                     for o in fn(*wrapped))

    return over_data


def physical_aval(aval: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The abstract value of what travels for `aval` (weak type kept: it steers tracing)."""
    shape, dtype = data_layout(aval.shape, aval.dtype)
    return jax.ShapeDtypeStruct(shape, dtype, weak_type=aval.weak_type and not is_key_dtype(
        aval.dtype))


#: Primitives that call back into the Python process that traced them.
_CALLBACK_PRIMITIVES = ("pure_callback", "io_callback", "debug_callback", "debug_print", "callback")


def find_host_callback(jaxpr) -> str | None:
    """The name of the first host-callback primitive in a (closed) jaxpr or its sub-jaxprs."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in inner.eqns:
        if eqn.primitive.name in _CALLBACK_PRIMITIVES:
            return eqn.primitive.name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found = find_host_callback(sub)
                    if found:
                        return found
    return None


def check_no_host_callback(jaxpr, name: str) -> None:
    """InvalidArgumentError when the function calls back into Python on the host."""
    found = find_host_callback(jaxpr)
    if found:
        raise InvalidArgumentError(
            f"{name} uses a host callback ({found}: jax.pure_callback, io_callback, "
            f"jax.debug.callback or jax.debug.print), which cannot run on the islands' hosts: "
            f"functions travel to them as StableHLO, and the Python they would call stays in "
            f"this process. Compute it with jax.numpy operations, or fetch the values and run "
            f"the callback here")
