"""Peak FLOP/s per device kind: the denominator of MFU.

MFU (PaLM, Chowdhery et al. 2022, Appendix B) = achieved FLOP/s / peak FLOP/s, where both count the
same devices. Accelerators get their peak from the vendor's datasheet (a table, per chip, dense, no
sparsity); a CPU has no honest datasheet figure for what XLA can reach, so it is calibrated in the same
run as the measurement it divides.

Two conventions a caller must keep straight:

* `peak_flops_for(device_kind, dtype)` is per device (per chip for the accelerators listed: TPU v4 and
  later and NVIDIA GPUs show one JAX device per chip).
* `calibrate_cpu_peak(dtype, devices)` and `peak_flops(devices, dtype)` are aggregates over `devices`.
  Simulated CPU devices (`jax_num_cpu_devices`) all share the host's cores, so "peak of one CPU device"
  depends on how many of its siblings are busy: eight devices on two cores do not reach eight times
  what one device alone reaches. The figure that makes MFU meaningful is what one process achieves
  with all its devices working at once, so calibration runs one matmul per device concurrently
  (sharded over `devices`) and reports the total. Divide it by `len(devices)` only for a per-device
  share that holds while all of them are busy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["PEAK_FLOPS", "calibrate_cpu_peak", "canonical_device_kind", "peak_flops", "peak_flops_for"]

_TPU_V4 = "Google Cloud TPU v4 docs (cloud.google.com/tpu/docs/v4); PaLM Appendix B uses 275 TFLOP/s"
_TPU_V5E = "Google Cloud TPU v5e docs (cloud.google.com/tpu/docs/v5e)"
_TPU_V5P = "Google Cloud TPU v5p docs (cloud.google.com/tpu/docs/v5p)"
_TPU_V6E = "Google Cloud TPU v6e (Trillium) docs (cloud.google.com/tpu/docs/v6e)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (dense, without sparsity)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (dense, without sparsity)"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (dense, without sparsity)"

# canonical kind -> dtype name -> (FLOP/s per chip, source). Dense figures only: vendors quote
# "with sparsity" numbers at twice these, which no dense training step can reach. "tfloat32" is the
# TensorFloat-32 tensor-core rate: XLA uses it for float32 dots on Ampere and later at JAX's default
# matmul precision, so a float32 model under default precision should be divided by the tf32 peak.
PEAK_FLOPS: dict[str, dict[str, tuple[float, str]]] = {
    "TPU v4": {"bfloat16": (275e12, _TPU_V4), "int8": (275e12, _TPU_V4)},
    "TPU v5e": {"bfloat16": (197e12, _TPU_V5E), "int8": (394e12, _TPU_V5E)},
    "TPU v5p": {"bfloat16": (459e12, _TPU_V5P), "int8": (918e12, _TPU_V5P)},
    "TPU v6e": {"bfloat16": (918e12, _TPU_V6E), "int8": (1836e12, _TPU_V6E)},
    "A100": {
        "bfloat16": (312e12, _A100),
        "float16": (312e12, _A100),
        "tfloat32": (156e12, _A100),
        "float32": (19.5e12, _A100),
        "float64": (19.5e12, _A100 + " (FP64 tensor core)"),
    },
    "H100 SXM": {
        "bfloat16": (989e12, _H100 + ", SXM5"),
        "float16": (989e12, _H100 + ", SXM5"),
        "tfloat32": (494.5e12, _H100 + ", SXM5"),
        "float32": (67e12, _H100 + ", SXM5"),
        "float64": (67e12, _H100 + ", SXM5 (FP64 tensor core)"),
    },
    "H100 PCIe": {
        "bfloat16": (756e12, _H100 + ", PCIe"),
        "float16": (756e12, _H100 + ", PCIe"),
        "tfloat32": (378e12, _H100 + ", PCIe"),
        "float32": (51e12, _H100 + ", PCIe"),
    },
    "H100 NVL": {
        "bfloat16": (835e12, _H100 + ", NVL"),
        "float16": (835e12, _H100 + ", NVL"),
        "tfloat32": (417.5e12, _H100 + ", NVL"),
        "float32": (60e12, _H100 + ", NVL"),
    },
    # The H200 is the H100's Hopper die with more HBM: the SXM part has the H100 SXM's rates.
    "H200": {
        "bfloat16": (989e12, _H200 + ", SXM"),
        "float16": (989e12, _H200 + ", SXM"),
        "tfloat32": (494.5e12, _H200 + ", SXM"),
        "float32": (67e12, _H200 + ", SXM"),
        "float64": (67e12, _H200 + ", SXM (FP64 tensor core)"),
    },
    "H200 NVL": {
        "bfloat16": (835e12, _H200 + ", NVL"),
        "float16": (835e12, _H200 + ", NVL"),
        "tfloat32": (417.5e12, _H200 + ", NVL"),
        "float32": (60e12, _H200 + ", NVL"),
    },
}

# JAX's device_kind strings, lower-cased, matched by substring in this order: the more specific pattern
# first ("tpu v5 lite" before "tpu v5", "h100 pcie" before "h100"). Kinds seen: "TPU v4", "TPU v5 lite"
# (v5e), "TPU v5p" or "TPU v5", "TPU v6 lite" (v6e), "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
# (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200" (SXM), "NVIDIA H200 NVL".
# A None kind marks a near-namesake with other rates (TPU v4i reports "TPU v4 lite"), so it is not
# mistaken for its sibling.
_KIND_PATTERNS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("tpu v4 lite",), None),
    (("tpu v4",), "TPU v4"),
    (("tpu v5 lite", "tpu v5e", "tpu v5litepod"), "TPU v5e"),
    (("tpu v5p", "tpu v5"), "TPU v5p"),
    (("tpu v6 lite", "tpu v6e"), "TPU v6e"),
    (("a100",), "A100"),
    (("h100 pcie", "h100-pcie"), "H100 PCIe"),
    (("h100 nvl", "h100nvl"), "H100 NVL"),
    (("h100",), "H100 SXM"),
    (("h200 nvl",), "H200 NVL"),
    (("h200",), "H200"),
)


def _dtype_name(dtype: Any) -> str:
    """A dtype's canonical name; accepts numpy/JAX dtypes and the strings "tf32"/"tfloat32"."""
    if isinstance(dtype, str) and dtype.lower() in ("tf32", "tfloat32"):
        return "tfloat32"
    return jnp.dtype(dtype).name


def canonical_device_kind(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` key for a JAX `device_kind` string, or None when the kind is not in the table."""
    lowered = device_kind.lower()
    for patterns, kind in _KIND_PATTERNS:
        if any(p in lowered for p in patterns):
            return kind
    return None


def peak_flops_for(device_kind: str, dtype: Any) -> tuple[float, str]:
    """Datasheet peak FLOP/s of ONE device of `device_kind` computing in `dtype`, and its source.

    Raises KeyError when the kind or the dtype is not in the table (CPUs never are: calibrate them).
    """
    kind = canonical_device_kind(device_kind)
    if kind is None:
        raise KeyError(f"no peak FLOP/s known for device kind {device_kind!r}")
    name = _dtype_name(dtype)
    try:
        flops, source = PEAK_FLOPS[kind][name]
    except KeyError:
        known = ", ".join(sorted(PEAK_FLOPS[kind]))
        raise KeyError(f"no {name} peak for {kind} (known: {known})") from None
    return flops, f"{kind} {name}: {source}"


def calibrate_cpu_peak(
    dtype: Any = jnp.float32,
    devices: Sequence[jax.Device] | None = None,
    sizes: Sequence[int] = (256, 512, 1024),
    repeats: int = 3,
    time_budget_s: float = 4.0,
) -> tuple[float, str]:
    """Best FLOP/s that this process reaches with square matmuls on all of `devices` at once.

    Each device multiplies its own (n, n) pair concurrently (one sharded, jitted call), for each n in
    `sizes`, `repeats` timed runs after a warm-up; the best run wins. The figure is the AGGREGATE over
    `devices` (see the module docstring): MFU = achieved FLOP/s of the same devices / this figure.
    `devices` defaults to every local CPU device. Sizes whose first run already exhausted
    `time_budget_s` are skipped, so slow dtypes (bfloat16 on CPUs without native support) stay cheap.
    """
    devices = list(devices if devices is not None else jax.local_devices(backend="cpu"))
    mesh = Mesh(np.array(devices), ("devices",))
    sharding = NamedSharding(mesh, PartitionSpec("devices"))
    # A shard_map-free batched matmul: the leading axis is split over the devices, so each device
    # runs one local (n, n) @ (n, n) and no collective is involved.
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b), out_shardings=sharding)
    start = time.perf_counter()
    best_flops, best_n = 0.0, 0
    for n in sizes:
        if time.perf_counter() - start > time_budget_s:
            break
        a = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
        b = jax.device_put(jnp.full((len(devices), n, n), 0.5, dtype), sharding)
        matmul(a, b).block_until_ready()  # compile and warm up
        flops = 2.0 * n**3 * len(devices)
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, b).block_until_ready()
            rate = flops / (time.perf_counter() - t0)
            if rate > best_flops:
                best_flops, best_n = rate, n
    if best_flops == 0.0:
        raise RuntimeError("CPU calibration ran no matmul: raise time_budget_s or pass smaller sizes")
    source = (
        f"calibrated: best {jnp.dtype(dtype).name} matmul, {best_n}x{best_n} per device, "
        f"{len(devices)} {devices[0].platform} devices at once (aggregate per process)"
    )
    return best_flops, source


def peak_flops(devices: Sequence[jax.Device], dtype: Any) -> tuple[float, str]:
    """Aggregate peak FLOP/s of `devices` in `dtype`, and its source: the MFU denominator.

    Accelerators: the per-chip datasheet figure times the number of devices. CPUs: calibrated now,
    over exactly these devices running together. Raises KeyError for accelerators not in the table.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("peak_flops needs at least one device")
    if devices[0].platform == "cpu":
        return calibrate_cpu_peak(dtype, devices)
    per_device, source = peak_flops_for(devices[0].device_kind, dtype)
    return per_device * len(devices), f"{len(devices)} x {per_device / 1e12:g} TFLOP/s ({source})"
