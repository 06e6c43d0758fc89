"""The programs of tests/test_conformance.py: each a JAX function, its arguments and its specs.

A case runs once through the cluster and once in-process (`jax.jit` on a mesh of the same shape);
the two run the same XLA program, so they must agree bit for bit (LAPACK, FFT and convolutions
included). `fn` takes the mesh (abstract on the cluster, concrete in-process) when `uses_mesh` is
set, for `shard_map`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

#: Mesh shapes by name: (shape, axis names). Every island has 4 devices.
MESHES = {"x4": ((4,), ("x",)), "xy": ((2, 2), ("x", "y")), "abc": ((1, 2, 2), ("a", "b", "c")),
          "x2": ((2,), ("x",)), "x1": ((1,), ("x",))}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    args: tuple
    mesh: str = "x4"
    in_specs: Any = None
    out_specs: Any = None
    donate: tuple[int, ...] = ()
    island: int = 0
    uses_mesh: bool = False

    def function(self, mesh) -> Callable:
        return self.fn(mesh) if self.uses_mesh else self.fn


CASES: list[Case] = []
_rng = np.random.default_rng(0)


def case(name, fn, *args, **options) -> None:
    CASES.append(Case(name, fn, args, **options))


def r(*shape, dtype=np.float32, low=-2, high=3):
    """Deterministic test data: floats in [-1, 1), integers in [low, high), booleans."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return _rng.random(shape) < 0.5
    if dtype.kind in "iu" or dtype.name.startswith(("int", "uint")):
        return _rng.integers(low, high, shape).astype(dtype)
    if dtype.kind == "c":
        return (_rng.uniform(-1, 1, shape) + 1j * _rng.uniform(-1, 1, shape)).astype(dtype)
    return _rng.uniform(-1, 1, shape).astype(dtype)


def spd(n):
    a = r(n, n)
    return (a @ a.T + n * np.eye(n)).astype(np.float32)


# -- meshes, specs, uneven shapes -----------------------------------------------------------------
case("add_sharded_1d", lambda a, b: a + b, r(8), r(8), in_specs=P("x"), out_specs=P("x"))
case("matmul_rows", lambda a, b: a @ b, r(8, 16), r(16, 4), in_specs=(P("x"), P()),
     out_specs=P("x"))
case("matmul_2d_mesh", lambda a, b: a @ b, r(8, 8), r(8, 4), mesh="xy",
     in_specs=(P("x", "y"), P("y")), out_specs=P("x"))
case("flattened_axes", lambda a: a * 3, r(8, 2), mesh="xy", in_specs=P(("x", "y")),
     out_specs=P(("y", "x")))
case("mesh_3d_reduce", lambda a: (a.sum(), a.sum(0), a.max(axis=(1, 2))), r(2, 4, 4),
     mesh="abc", in_specs=P("a", "b", "c"), out_specs=(P(), P("b", "c"), P()))
case("mesh_3d_transpose", lambda a: a.T, r(4, 4), mesh="abc", in_specs=P("b", "c"),
     out_specs=P("c", "b"))
case("island_1_two_devices", lambda a: jnp.tanh(a) * 2, r(6, 4), mesh="x2", in_specs=P("x"),
     out_specs=P(None, "x"), island=1)
case("one_device_mesh", lambda a: jnp.cumsum(a), r(9), mesh="x1", in_specs=P("x"),
     out_specs=P("x"))
case("uneven_replicated", lambda a: (a.sum(0), a.mean(1), a[1:4, ::2]), r(5, 3))
case("uneven_minor_dim", lambda a: a * a.sum(1, keepdims=True), r(8, 5), in_specs=P("x"),
     out_specs=P("x"))
case("odd_length", lambda a: jnp.cumsum(a[::-1]), r(7))
case("sharded_minor_axis", lambda a: a - a.mean(0), r(3, 4), mesh="xy", in_specs=P(None, "y"),
     out_specs=P(None, "y"))
case("reshape_across_shards", lambda a: a.reshape(4, 8), r(8, 4), in_specs=P("x"),
     out_specs=P("x"))
case("reshard_inside", lambda a: a @ a.T, r(8, 8), mesh="xy", in_specs=P("x"),
     out_specs=P(None, ("x", "y")))
case("broadcasting", lambda a, b: a + b, r(4, 1), r(1, 8), out_specs=P(None, "x"))
case("integer_matmul", lambda a, b: a @ b, r(8, 4, dtype=np.int32), r(4, 4, dtype=np.int32),
     in_specs=P("x"))

# -- pytrees ------------------------------------------------------------------------------------
Point = collections.namedtuple("Point", "x y")
case("dict_in_out", lambda d: {"sum": d["a"] + d["b"], "prod": d["a"] * d["b"]},
     {"a": r(8), "b": r(8)}, in_specs=({"a": P("x"), "b": P()},),
     out_specs={"sum": P("x"), "prod": P()})
case("tuple_in_out", lambda t: (t[1], t[0] * 2), (r(4), r(8)), in_specs=((P("x"), P()),))
case("namedtuple", lambda p: Point(p.y, p.x + p.y), Point(r(8), r(8)),
     in_specs=(Point(P("x"), P("x")),), out_specs=Point(P(), P("x")))
case("nested", lambda t: {"l": [t["p"][0] + 1, (t["p"][1], t["q"])], "n": t["q"].sum()},
     {"p": [r(4), r(8)], "q": r(4, 4)}, out_specs={"l": [P("x"), (P(), P("x"))], "n": P()})
case("none_in_args_and_outputs", lambda a, n, b: (a + b, None, {"k": a, "z": None}), r(8), None,
     r(8), in_specs=(P("x"), None, P()), out_specs=(P("x"), None, {"k": P("x"), "z": None}))
case("none_spec_means_replicated", lambda t: t, (r(8), r(8)), in_specs=((None, P("x")),),
     out_specs=(P("x"), None))
case("empty_subtrees", lambda a, e: (a, (), {}, [e]), r(4), (), out_specs=(P("x"), (), {}, [()]))
case("list_args", lambda xs: sum(xs), [r(8), r(8), r(8)], in_specs=[[P("x"), P(), P("x")]])
case("constant_output", lambda a: (a, 1.0, 7), r(4))
case("dict_key_order", lambda d: [d[k] * i for i, k in enumerate(sorted(d))],
     {"z": r(4), "a": r(4), "m": r(4)})

# -- dtypes -------------------------------------------------------------------------------------
_NUMERIC = ["bfloat16", "float16", "float32", "int8", "int16", "int32", "uint8", "uint16",
            "uint32", "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz"]
for _name in _NUMERIC:
    _dt = np.dtype(getattr(ml_dtypes, _name, None) or _name)
    _ops = (lambda a, b: (a + b, a * b, a == b, a[::-1], jnp.zeros_like(a) - a)) if _dt.kind == "c" \
        else (lambda a, b: (a + b, a * b, a == b, a[::-1], jnp.maximum(a, b), a.astype(jnp.float32)))
    case(f"dtype_{_name}", _ops, r(8, dtype=_dt, low=0, high=4), r(8, dtype=_dt, low=0, high=4),
         in_specs=P("x"))
case("dtype_bool", lambda a, b: (a & b, a | b, ~a, a ^ b, a.sum(), jnp.any(a)), r(8, dtype=bool),
     r(8, dtype=bool), in_specs=P("x"))
for _wide in ("float64", "int64", "uint64", "complex128"):
    case(f"x64_canonical_{_wide}", lambda a: (a, a * 2, a.dtype.itemsize + a[:1]),
         r(4, dtype=_wide, low=0, high=9))
case("python_float_is_weak_bf16", lambda a, s: a * s, r(8, dtype=ml_dtypes.bfloat16), 2.0)
case("python_int_is_weak_int8", lambda a, s: a * s, r(8, dtype=np.int8), 3)
case("python_int_weak_uint8", lambda a, s: a + s, r(8, dtype=np.uint8, low=0, high=9), 250)
case("python_float_weak_f16", lambda a, s: a / s, r(8, dtype=np.float16), 3.0)
case("python_complex_weak", lambda a, s: a * s, r(4, dtype=np.complex64), 1j)
case("python_scalars_alone", lambda s, t, u: (s * t, u, s + 1), 2.5, 4, True)
case("numpy_scalar_is_strong", lambda a, s: a * s, r(8, dtype=ml_dtypes.bfloat16), np.float32(2))
case("promotion_bf16_f16", lambda a, b: a + b, r(4, dtype=ml_dtypes.bfloat16),
     r(4, dtype=np.float16))
case("promotion_int8_uint8", lambda a, b: a + b, r(4, dtype=np.int8), r(4, dtype=np.uint8))
case("integer_wraparound", lambda a: (a * 100, a + 127), r(8, dtype=np.int8, low=-5, high=5))

# -- 0-d and empty ------------------------------------------------------------------------------
case("zero_d", lambda a, b: (a * b, jnp.sin(a)), np.float32(1.5), np.float32(-2))
case("zero_d_from_reduction", lambda a: (a.sum(), a.max(), a.argmin()), r(8), in_specs=P("x"))
case("empty_sharded", lambda a: a * 2, np.zeros((0, 3), np.float32), in_specs=P("x"),
     out_specs=P("x"))
case("empty_matmul", lambda a, b: a @ b, np.zeros((4, 0), np.float32),
     np.zeros((0, 3), np.float32))
case("empty_reductions", lambda a: (a.sum(1), a.max(1, initial=-1.0), a.size), np.zeros((4, 0)))
case("empty_int", lambda a: jnp.concatenate([a, a]), np.zeros((0,), np.int32))


# -- shard_map collectives ----------------------------------------------------------------------
def smap(body, in_specs, out_specs):
    return lambda mesh: jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def ring(n):
    return [(i, (i + 1) % n) for i in range(n)]


_COLLECTIVES = {
    "psum": (lambda a: jax.lax.psum(a, "x"), P()),
    "pmean": (lambda a: jax.lax.pmean(a, "x"), P()),
    "pmax": (lambda a: jax.lax.pmax(a, "x"), P()),
    "pmin": (lambda a: jax.lax.pmin(a, "x"), P()),
    "all_gather": (lambda a: jax.lax.all_gather(a, "x"), P("x")),
    "all_gather_tiled": (lambda a: jax.lax.all_gather(a, "x", tiled=True), P("x")),
    "ppermute": (lambda a: jax.lax.ppermute(a, "x", ring(4)), P("x")),
    "all_to_all": (lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True), P("x")),
    "psum_scatter": (lambda a: jax.lax.psum_scatter(a, "x", tiled=True), P("x")),
    "axis_index": (lambda a: a * jax.lax.axis_index("x"), P("x")),
}
for _name, (_body, _out) in _COLLECTIVES.items():
    case(f"shard_map_{_name}", smap(_body, P("x"), _out), r(16, 4), in_specs=P("x"),
         out_specs=_out, uses_mesh=True)
case("shard_map_int_psum", smap(lambda a: jax.lax.psum(a, "x"), P("x"), P()),
     r(8, dtype=np.int32), in_specs=P("x"), out_specs=P(), uses_mesh=True)
case("shard_map_2d_one_axis", smap(lambda a: jax.lax.psum(a, "y"), P("x", "y"), P("x")),
     r(4, 4), mesh="xy", in_specs=P("x", "y"), out_specs=P("x"), uses_mesh=True)
case("shard_map_2d_both_axes", smap(lambda a: jax.lax.psum(a, ("x", "y")), P("x", "y"), P()),
     r(4, 4), mesh="xy", in_specs=P("x", "y"), out_specs=P(), uses_mesh=True)
case("shard_map_2d_ppermute", smap(lambda a: jax.lax.ppermute(a, "y", ring(2)), P("x", "y"),
                                   P("x", "y")),
     r(4, 4), mesh="xy", in_specs=P("x", "y"), out_specs=P("x", "y"), uses_mesh=True)
case("shard_map_axis_index_3d", smap(lambda a: a + jax.lax.axis_index("c")
                                     + 10 * jax.lax.axis_index("b"), P("b", "c"), P("b", "c")),
     r(4, 4, dtype=np.int32), mesh="abc", in_specs=P("b", "c"), out_specs=P("b", "c"),
     uses_mesh=True)

# -- control flow -------------------------------------------------------------------------------
case("scan_cumulative", lambda a: jax.lax.scan(lambda c, x: (c + x, c * x), 0.0, a), r(16))
case("scan_pytree_carry", lambda a: jax.lax.scan(
    lambda c, x: ({"s": c["s"] + x, "n": c["n"] + 1}, x * c["n"]),
    {"s": jnp.zeros(4), "n": 0}, a), r(5, 4))
case("while_loop", lambda a: jax.lax.while_loop(lambda c: c[1] < 10,
                                                lambda c: (c[0] * 1.5 + 1, c[1] + 1), (a, 0)),
     r(8), in_specs=P("x"))
case("cond", lambda p, a: jax.lax.cond(p > 0, jnp.sin, jnp.cos, a), np.float32(1), r(8))
case("cond_false", lambda p, a: jax.lax.cond(p > 0, jnp.sin, jnp.cos, a), np.float32(-1), r(8))
case("switch", lambda i, a: jax.lax.switch(i, [jnp.sin, jnp.cos, jnp.tanh], a), np.int32(2),
     r(8))
case("fori_loop", lambda a: jax.lax.fori_loop(0, 20, lambda i, c: c * 0.9 + i, a), r(8),
     in_specs=P("x"), out_specs=P("x"))
case("lax_map", lambda a: jax.lax.map(lambda row: row.sum() * row, a), r(4, 3))
case("vmap", lambda a, b: jax.vmap(jnp.dot)(a, b), r(4, 3), r(4, 3))
case("associative_scan", lambda a: jax.lax.associative_scan(jnp.add, a), r(16))
case("nested_control", lambda a: jax.lax.cond(
    a.sum() > 0, lambda v: jax.lax.scan(lambda c, x: (c + x, c), 0.0, v)[1],
    lambda v: jax.lax.fori_loop(0, 3, lambda i, c: c + i, v), a), r(6))

# -- autodiff -----------------------------------------------------------------------------------
def _loss(w, x):
    return jnp.mean(jnp.tanh(x @ w) ** 2)


@jax.custom_vjp
def _clip_gradient(x):
    return x


_clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


@jax.custom_jvp
def _softplus(x):
    return jnp.log1p(jnp.exp(x))


_softplus.defjvp(lambda primals, tangents: (_softplus(primals[0]),
                                            jax.nn.sigmoid(primals[0]) * tangents[0]))
case("grad", jax.grad(_loss), r(4, 2), r(8, 4), in_specs=(P(), P("x")))
case("value_and_grad", jax.value_and_grad(_loss, argnums=(0, 1)), r(4, 2), r(8, 4))
case("custom_vjp", jax.grad(lambda x: (_clip_gradient(x) ** 3).sum()), r(8))
case("custom_jvp", jax.grad(lambda x: _softplus(x).sum()), r(8))
case("checkpoint", jax.grad(lambda x: jax.checkpoint(lambda v: jnp.sin(jnp.sin(v)))(x).sum()),
     r(8))
case("hessian", jax.hessian(lambda x: (x ** 3).sum() + x[0] * x[1]), r(3))
case("jacfwd", jax.jacfwd(lambda x: jnp.sin(x) * x.sum()), r(4))
case("jacrev", jax.jacrev(lambda x: jnp.cos(x) @ x), r(4))
case("grad_sharded_matmul", jax.grad(lambda w, x: ((x @ w) ** 2).sum()), r(4, 4), r(8, 4),
     mesh="xy", in_specs=(P(None, "y"), P("x")), out_specs=P())

# -- custom calls and numerics ------------------------------------------------------------------
case("cholesky", jnp.linalg.cholesky, spd(4))
case("eigh", jnp.linalg.eigh, spd(4))
case("svd", lambda a: jnp.linalg.svd(a, compute_uv=False), r(5, 3))
case("qr", lambda a: jnp.abs(jnp.linalg.qr(a).R), r(4, 3))
case("solve", jnp.linalg.solve, spd(4), r(4, 2))
case("det", jnp.linalg.det, spd(4))
case("slogdet", jnp.linalg.slogdet, spd(3))
case("inv", jnp.linalg.inv, spd(3))
case("lu", lambda a: jax.scipy.linalg.lu_factor(a), spd(4))
case("triangular_solve", lambda a, b: jax.scipy.linalg.solve_triangular(a, b, lower=True),
     np.tril(spd(4)), r(4, 2))
case("sort", lambda a: (jnp.sort(a), jnp.argsort(a), jnp.sort(a, axis=0)), r(4, 6))
case("top_k", lambda a: jax.lax.top_k(a, 3), r(4, 8))
case("fft", jnp.fft.fft, r(8, dtype=np.complex64))
case("rfft_irfft", lambda a: jnp.fft.irfft(jnp.fft.rfft(a)), r(16))
case("fft2", jnp.fft.fft2, r(4, 4, dtype=np.complex64))
case("conv", lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME"), r(2, 3, 8, 8),
     r(4, 3, 3, 3))
case("conv_grouped_strided", lambda x, k: jax.lax.conv_general_dilated(
    x, k, (2, 2), "VALID", feature_group_count=2), r(1, 4, 9, 9), r(4, 2, 3, 3))
case("einsum", lambda a, b: jnp.einsum("ijk,kl->jil", a, b), r(2, 3, 4), r(4, 5))
case("softmax_logsumexp", lambda a: (jax.nn.softmax(a), jax.nn.logsumexp(a, axis=0)), r(4, 8))
case("special_functions", lambda a: (jax.scipy.special.erf(a), jnp.exp(a), jnp.log1p(a + 1),
                                     jax.lax.rsqrt(a * a + 1)), r(8))
case("nan_inf", lambda a: (a / 0.0, jnp.log(a - 2), jnp.nanmax(jnp.where(a > 0, a, jnp.nan))),
     r(8))
case("integer_division", lambda a, b: (a // b, a % b, jnp.right_shift(a, 1), a << 2),
     r(8, dtype=np.int32, low=-9, high=9), r(8, dtype=np.int32, low=1, high=4))
case("scatter_gather", lambda a, i: (a.at[i].add(1.0), a[i], a.at[::2].set(0)), r(8),
     np.array([1, 3, 3], np.int32))
case("dynamic_slice", lambda a, i: jax.lax.dynamic_slice(a, (i, 0), (2, 3)), r(5, 3),
     np.int32(2))
case("pad_concat_tile", lambda a: (jnp.pad(a, 2), jnp.concatenate([a, a], 1), jnp.tile(a, 2)),
     r(2, 3))
case("argmax_one_hot", lambda a: jax.nn.one_hot(jnp.argmax(a, 1), 5), r(4, 5))
case("rounding", lambda a: (jnp.round(a * 10), jnp.floor(a), jnp.ceil(a), a.astype(jnp.int32)),
     r(8) * 7)
case("cumulative", lambda a: (jnp.cumsum(a, 1), jnp.cumprod(a, 0), jnp.diff(a)), r(3, 4))
case("clip_where", lambda a: jnp.where(a > 0, jnp.clip(a, 0.2, 0.5), -a), r(8), in_specs=P("x"),
     out_specs=P("x"))
case("iota_and_constants", lambda a: a + jnp.arange(8.0) + jnp.pi, r(8))

# -- closures and PRNG --------------------------------------------------------------------------
_TABLE = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
_BIG = _rng.uniform(-1, 1, 1 << 20).astype(np.float32)  # 4 MiB
case("closure_1mib_constant", lambda i: jnp.asarray(_TABLE)[i] + _TABLE.sum(),
     np.array([3, 99], np.int32))
case("closure_4mib_constant", lambda a: (_BIG.reshape(-1, 4) @ a).sum(), r(4))
case("closure_partial", functools.partial(lambda k, a: a * k, 3.0), r(4))
case("typed_key_in", lambda k: jax.random.normal(k, (4,)), jax.random.key(1))
case("typed_key_out", lambda k: jax.random.split(k, 4), jax.random.key(2), out_specs=P("x"))
case("typed_keys_sharded", lambda ks: jax.vmap(lambda k: jax.random.uniform(k, (2,)))(ks),
     jax.random.split(jax.random.key(3), 8), in_specs=P("x"), out_specs=P("x"))
case("legacy_uint32_key", lambda k: (jax.random.bernoulli(k, 0.3, (8,)),
                                     jax.random.permutation(k, 8)), jax.random.PRNGKey(4))
case("key_impl_rbg", lambda k: jax.random.bits(jax.random.fold_in(k, 3), (4,)),
     jax.random.key(5, impl="rbg"))
case("key_data_roundtrip", lambda k: jax.random.wrap_key_data(jax.random.key_data(k) + 1),
     jax.random.key(6))

# -- donation -----------------------------------------------------------------------------------
case("donate_one", lambda a, b: (a + b, b), r(8), r(8), in_specs=P("x"), out_specs=P("x"),
     donate=(0,))
case("donate_all_tree", lambda t: jax.tree.map(lambda v: v * 2, t), {"a": r(8), "b": r(4)},
     donate=(0,))
