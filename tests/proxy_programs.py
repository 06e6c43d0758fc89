"""Plain-JAX programs for the proxy's conformance test (tests/test_proxy_conformance.py).

Each program takes 8 devices (the first four on one island, the last four on another, when run
through the proxy) and returns a pytree of arrays. The test runs every program through the proxy
backend, in a subprocess (`python tests/proxy_programs.py ADDRESS OUT.npz`), and again on this
process's CPU devices, and compares the results. Programs use deterministic inputs only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

try:
    from jax import shard_map
except ImportError:  # older JAX
    from jax.experimental.shard_map import shard_map

PROGRAMS: dict[str, Callable] = {}


def program(fn: Callable) -> Callable:
    PROGRAMS[fn.__name__] = fn
    return fn


def data(*shape, dtype=np.float32, seed=0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(shape)
    return values.astype(dtype)


def mesh(devices, shape=(2, 2), names=("data", "model"), first=0) -> Mesh:
    n = int(np.prod(shape))
    return Mesh(np.array(devices[first:first + n]).reshape(shape), names)


def put(devices, value, spec=P(), **kw):
    return jax.device_put(value, NamedSharding(mesh(devices, **kw), spec))


# -- device_put and reading back -----------------------------------------------------------------

@program
def put_single_device(d):
    return jax.device_put(data(5, 3), d[2])


@program
def put_sharded_2d(d):
    return put(d, data(8, 8), P("data", "model"))


@program
def put_replicated(d):
    return put(d, data(4, 6))


@program
def put_one_axis(d):
    return put(d, data(8, 4), P("model"))


@program
def put_axes_joined(d):
    return put(d, data(4, 8), P(None, ("data", "model")))


@program
def put_transposed_mesh(d):
    m = Mesh(np.array(d[:4]).reshape(2, 2).T, ("x", "y"))
    return jax.device_put(data(8, 8), NamedSharding(m, P("x", "y")))


@program
def addressable_shards(d):
    x = put(d, data(8, 4), P("data"))
    return [np.asarray(s.data) for s in x.addressable_shards]


@program
def assemble_from_shards(d):
    x = put(d, data(8, 4), P("data", "model"))
    return jax.make_array_from_single_device_arrays(
        x.shape, x.sharding, [s.data for s in x.addressable_shards]) * 2


@program
def from_callback(d):
    sharding = NamedSharding(mesh(d), P("data"))
    full = data(8, 2)
    return jax.make_array_from_callback((8, 2), sharding, lambda index: full[index])


# -- jit -----------------------------------------------------------------------------------------

@program
def issue_example(d):
    x = put(d, np.ones((8, 8), np.float32), P("data", "model"))
    return jax.jit(lambda a: (a @ a.T).sum(0))(x)


@program
def matmul_sharded(d):
    a = put(d, data(8, 16, seed=1), P("data", None))
    b = put(d, data(16, 4, seed=2), P(None, "model"))
    return jax.jit(jnp.matmul)(a, b)


@program
def elementwise_chain(d):
    x = put(d, data(16, 8), P("data", "model"))
    return jax.jit(lambda v: jnp.tanh(v) * jnp.exp(-v * v) + jnp.sin(v))(x)


@program
def reductions(d):
    x = put(d, data(8, 8), P("data", "model"))
    return jax.jit(lambda v: (v.sum(), v.max(0), v.mean(1), jnp.argmax(v, 1)))(x)


@program
def out_shardings(d):
    m = mesh(d)
    x = put(d, data(8, 8), P("data"))
    f = jax.jit(lambda v: v * 3, out_shardings=NamedSharding(m, P(None, "model")))
    y = f(x)
    return y, np.asarray(y.addressable_shards[1].data)


@program
def sharding_constraint(d):
    m = mesh(d)
    x = put(d, data(8, 8), P())

    def f(v):
        v = lax.with_sharding_constraint(v * 2, NamedSharding(m, P("model", "data")))
        return v.T @ v
    return jax.jit(f)(x)


@program
def eager_ops(d):
    x = jax.device_put(data(6), d[1])
    return (x + 1) * x - jnp.sqrt(jnp.abs(x))


@program
def jnp_creation(d):
    with jax.default_device(d[3]):
        return jnp.arange(12).reshape(3, 4) * 2, jnp.zeros((2, 2)), jnp.eye(3)


@program
def many_calls(d):
    f = jax.jit(lambda v: v * 1.01 + 0.5)
    x = put(d, data(8, 8), P("data", "model"))
    for _ in range(25):
        x = f(x)
    return x


@program
def multiple_outputs_and_inputs(d):
    xs = [put(d, data(8, 2, seed=i), P("data")) for i in range(4)]
    return jax.jit(lambda a, b, c, e: (a + b, c - e, a * e, b / (1 + c * c)))(*xs)


@program
def scan_loop(d):
    x = put(d, data(4, 4))

    def step(carry, _):
        return carry @ carry * 0.5 + 0.1, carry.sum()
    return jax.jit(lambda v: lax.scan(step, v, None, length=5))(x)


@program
def while_loop(d):
    x = jax.device_put(np.float32(1.0), d[0])
    return jax.jit(lambda v: lax.while_loop(lambda c: c[0] < 100, lambda c: (c[0] * 2, c[1] + 1),
                                            (v, 0)))(x)


@program
def cond_and_select(d):
    x = put(d, data(8), P("data"))
    f = jax.jit(lambda v, p: lax.cond(p, lambda u: u * 2, lambda u: -u, v))
    return f(x, True), f(x, False), jax.jit(lambda v: jnp.where(v > 0, v, 0.0))(x)


@program
def vmap_program(d):
    x = put(d, data(8, 4), P("data"))
    return jax.jit(jax.vmap(lambda row: jnp.dot(row, row)))(x)


@program
def indexing_updates(d):
    x = put(d, data(8, 8), P("data"))
    return jax.jit(lambda v: (v.at[2, 3].set(7.0).at[:, 0].add(1.0), v[1:5, ::2],
                              lax.dynamic_slice(v, (2, 2), (3, 3))))(x)


@program
def sort_and_cumsum(d):
    x = put(d, data(16), P())
    return jax.jit(lambda v: (jnp.sort(v), jnp.cumsum(v), jnp.argsort(v)))(x)


@program
def softmax_layernorm(d):
    x = put(d, data(8, 16), P("data"))

    def f(v):
        s = jax.nn.softmax(v, axis=-1)
        m, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return s, (v - m) / jnp.sqrt(var + 1e-5)
    return jax.jit(f)(x)


@program
def convolution(d):
    img = jax.device_put(data(2, 3, 8, 8), d[0])
    kernel = jax.device_put(data(4, 3, 3, 3, seed=1), d[0])
    return jax.jit(lambda a, k: lax.conv(a, k, (1, 1), "SAME"))(img, kernel)


@program
def random_numbers(d):
    key = jax.random.key(42)
    f = jax.jit(lambda k: (jax.random.normal(k, (4, 4)), jax.random.randint(k, (5,), 0, 10)))
    return f(key)


# -- shard_map and collectives -------------------------------------------------------------------

@program
def shard_map_psum(d):
    m = mesh(d)
    x = put(d, data(8, 8), P("data", "model"))
    f = shard_map(lambda b: lax.psum(b, "model"), mesh=m, in_specs=P("data", "model"),
                  out_specs=P("data", None))
    return jax.jit(f)(x)


@program
def shard_map_all_gather(d):
    m = mesh(d)
    x = put(d, data(8, 4), P("data"))
    f = shard_map(lambda b: lax.all_gather(b, "data", tiled=True), mesh=m, in_specs=P("data"),
                  out_specs=P(), check_vma=False)
    return jax.jit(f)(x)


@program
def shard_map_ppermute(d):
    m = mesh(d, shape=(4,), names=("ring",))
    x = put(d, data(8, 2), P("ring"), shape=(4,), names=("ring",))
    perm = [(i, (i + 1) % 4) for i in range(4)]
    f = shard_map(lambda b: lax.ppermute(b, "ring", perm), mesh=m, in_specs=P("ring"),
                  out_specs=P("ring"))
    return jax.jit(f)(x)


@program
def shard_map_all_to_all(d):
    m = mesh(d, shape=(4,), names=("x",))
    x = put(d, data(8, 8), P("x"), shape=(4,), names=("x",))
    f = shard_map(lambda b: lax.all_to_all(b, "x", 1, 0, tiled=True), mesh=m, in_specs=P("x"),
                  out_specs=P(None, "x"))
    return jax.jit(f)(x)


@program
def shard_map_psum_scatter(d):
    m = mesh(d, shape=(4,), names=("x",))
    x = put(d, data(8, 4), P(), shape=(4,), names=("x",))
    f = shard_map(lambda b: lax.psum_scatter(b, "x", tiled=True), mesh=m, in_specs=P(),
                  out_specs=P("x"))
    return jax.jit(f)(x)


@program
def shard_map_on_second_island(d):
    m = mesh(d, first=4)
    x = put(d, data(8, 8), P("data", "model"), first=4)
    f = shard_map(lambda b: lax.pmean(b * 2, ("data", "model")), mesh=m,
                  in_specs=P("data", "model"), out_specs=P())
    return jax.jit(f)(x)


# -- autodiff ------------------------------------------------------------------------------------

@program
def grad_of_loss(d):
    w = put(d, data(4, 4), P("model"))
    x = put(d, data(8, 4, seed=3), P("data"))
    return jax.jit(jax.grad(lambda w_, x_: jnp.mean(jnp.tanh(x_ @ w_) ** 2)))(w, x)


@program
def value_and_grad_pytree(d):
    params = {"w": put(d, data(4, 3)), "b": put(d, data(3, seed=1))}
    x = put(d, data(8, 4, seed=2), P("data"))

    def loss(p, x_):
        return jnp.sum((x_ @ p["w"] + p["b"]) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params, x)


@program
def sgd_steps(d):
    params = {"w": put(d, data(4, 4), P(None, "model")), "b": put(d, np.zeros(4, np.float32))}
    x = put(d, data(8, 4, seed=5), P("data"))

    @jax.jit
    def step(p, x_):
        g = jax.grad(lambda q: jnp.mean((x_ @ q["w"] + q["b"]) ** 2))(p)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    for _ in range(3):
        params = step(params, x)
    return params


# -- donation and pytrees ------------------------------------------------------------------------

@program
def donation(d):
    x = put(d, data(8, 8), P("data"))
    f = jax.jit(lambda v: v * 2 + 1, donate_argnums=0)
    y = f(x)
    return y, np.array(x.is_deleted())


@program
def donation_loop(d):
    f = jax.jit(lambda v, g: v - 0.5 * g, donate_argnums=0)
    x = put(d, data(4, 4), P("data"))
    g = put(d, data(4, 4, seed=1), P("data"))
    for _ in range(5):
        x = f(x, g)
    return x


@program
def pytree_in_out(d):
    tree = {"a": jax.device_put(data(3), d[0]), "b": (jax.device_put(data(2, 2), d[0]),
                                                      [jax.device_put(data(4), d[0])])}
    return jax.jit(lambda t: {"sum": t["a"].sum() + t["b"][0].sum(), "parts": t["b"][1]})(tree)


@program
def device_get_tree(d):
    tree = [put(d, data(4, 4), P("data")), {"k": jax.device_put(data(2), d[1])}]
    return jax.device_get(tree)


# -- dtypes --------------------------------------------------------------------------------------

@program
def dtype_bfloat16(d):
    x = put(d, data(8, 8).astype(jnp.bfloat16), P("data"))
    return jax.jit(lambda v: (v * 2).astype(jnp.float32))(x), x


@program
def dtype_float16(d):
    x = put(d, data(4, 4).astype(np.float16), P("model"))
    return jax.jit(lambda v: v @ v)(x)


@program
def dtype_int32(d):
    x = put(d, np.arange(16, dtype=np.int32).reshape(4, 4), P("data"))
    return jax.jit(lambda v: (v * 3 // 2, v % 5, v << 1))(x)


@program
def dtype_small_ints(d):
    a = jax.device_put(np.arange(10, dtype=np.int8), d[1])
    b = jax.device_put(np.arange(10, dtype=np.uint8) * 20, d[1])
    return jax.jit(lambda x, y: (x * 3, y + 100, x.astype(np.int16)))(a, b)


@program
def dtype_bool(d):
    x = put(d, data(8, 8), P("data", "model"))
    return jax.jit(lambda v: (v > 0, jnp.any(v > 2), jnp.logical_not(v > 0)))(x)


@program
def dtype_complex(d):
    x = jax.device_put((data(4) + 1j * data(4, seed=1)).astype(np.complex64), d[2])
    return jax.jit(lambda v: (v * v.conj(), jnp.abs(v), jnp.fft.fft(v)))(x)


@program
def dtype_uint32_bits(d):
    x = jax.device_put(np.arange(8, dtype=np.uint32) * 123456789, d[0])
    return jax.jit(lambda v: (v ^ (v >> 3), v.astype(np.float32)))(x)


# -- transfers between islands' device sets ------------------------------------------------------

@program
def transfer_mesh_to_other_island(d):
    x = put(d, data(8, 8), P("data", "model"))
    y = jax.device_put(x, NamedSharding(mesh(d, first=4), P("data", "model")))
    return y, jax.jit(lambda v: v * 2)(y)


@program
def transfer_reshard_across_islands(d):
    x = put(d, data(8, 8), P("data"))
    return jax.device_put(x, NamedSharding(mesh(d, first=4), P(None, "model")))


@program
def transfer_single_device_hop(d):
    x = jax.device_put(data(16), d[0])
    y = jax.device_put(x, d[6])
    z = jax.device_put(y * 2, d[1])
    return z


@program
def transfer_round_trip_compute(d):
    x = put(d, data(8, 4), P("data"))
    f = jax.jit(lambda v: v + 1)
    y = f(jax.device_put(x, NamedSharding(mesh(d, first=4), P("data"))))
    return f(jax.device_put(y, NamedSharding(mesh(d), P("model"))))


@program
def transfer_gather_to_one_device(d):
    x = put(d, data(8, 8), P("data", "model"), first=4)
    return jax.device_put(x, d[0]).sum()


@program
def reshard_same_devices(d):
    x = put(d, data(8, 8), P("data", "model"))
    return jax.device_put(x, NamedSharding(mesh(d), P(("model", "data"))))


def run_all(devices, names=None) -> dict[str, list[np.ndarray]]:
    """Every program's outputs, flattened to NumPy leaves (with `dtype_names`)."""
    results = {}
    for name, fn in PROGRAMS.items():
        if names and name not in names:
            continue
        try:
            out = fn(devices)
            results[name] = [np.asarray(jax.random.key_data(x) if _is_key(x) else x)
                             for x in jax.tree.leaves(out)]
        except Exception as exc:  # which program failed: the traceback alone does not say
            raise RuntimeError(f"program {name!r} failed: {exc}") from exc
    return results


def portable(value: np.ndarray) -> np.ndarray:
    """A result as .npz keeps it: bfloat16 (which it cannot hold) as float32, losslessly."""
    return value.astype(np.float32) if value.dtype == jnp.bfloat16 else value


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def main(argv: list[str]) -> int:
    """Runs every program through the proxy at argv[1]; writes results to argv[2] (.npz)."""
    import runtime.proxy

    runtime.proxy.connect(argv[1], name="conformance")
    devices = jax.devices()
    results = run_all(devices)
    flat = {f"{name}/{i}": portable(value) for name, values in results.items()
            for i, value in enumerate(values)}
    flat.update({f"{name}/{i}/dtype": np.array(value.dtype.name)
                 for name, values in results.items() for i, value in enumerate(values)})
    flat["__devices__"] = np.array([[d.id, d.island, d.host, d.process_index]
                                    for d in devices])
    np.savez(argv[2], **flat)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
