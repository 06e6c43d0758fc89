"""Peak FLOP/s table lookups and the CPU calibration (fast)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from model.peaks import calibrate_cpu_peak, canonical_device_kind, peak_flops, peak_flops_for


@pytest.mark.parametrize(
    "device_kind, dtype, expected",
    [
        ("TPU v4", jnp.bfloat16, 275e12),
        ("TPU v5 lite", jnp.bfloat16, 197e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v5", jnp.bfloat16, 459e12),
        ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-40GB", jnp.float32, 19.5e12),
        ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 67e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12),
        ("NVIDIA H100 PCIe", jnp.bfloat16, 756e12),
        ("NVIDIA H200", jnp.bfloat16, 989e12),
    ],
)
def test_table_lookup(device_kind, dtype, expected):
    flops, source = peak_flops_for(device_kind, dtype)
    assert flops == expected
    assert canonical_device_kind(device_kind) in source


@pytest.mark.parametrize("device_kind, dtype", [("cpu", jnp.float32), ("TPU v4 lite", jnp.bfloat16),
                                                ("TPU v4", jnp.float32), ("Some Future Chip", jnp.bfloat16)])
def test_unknown_kind_or_dtype_raises(device_kind, dtype):
    with pytest.raises(KeyError):
        peak_flops_for(device_kind, dtype)


def test_accelerator_peak_is_aggregate_over_devices():
    chips = [SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")] * 4
    flops, source = peak_flops(chips, jnp.bfloat16)
    assert flops == 4 * 989e12
    assert "4 x" in source


def test_cpu_calibration_is_positive_and_documented():
    devices = jax.devices("cpu")[:2]
    flops, source = calibrate_cpu_peak(jnp.float32, devices, sizes=(64, 128), repeats=1)
    assert 1e8 < flops < 1e14  # any real CPU lies in this range
    assert "aggregate" in source and f"{len(devices)} cpu devices" in source
    flops_via_peak, _ = peak_flops(devices, jnp.float32)
    assert flops_via_peak > 0
