"""Settings of a simulated host: its devices, how long their computations take, what it keeps."""

from __future__ import annotations

import dataclasses

#: Default speed of one simulated device (FLOP/s): about one accelerator chip of the paper's era.
DEFAULT_FLOPS_PER_S = 100e12
#: Arrays of at most this many bytes on a host keep their data; larger ones only their shape.
DEFAULT_DATA_LIMIT_BYTES = 64 << 10
#: Memory a simulated device reports (bytes); nothing is allocated for it.
DEFAULT_DEVICE_MEMORY_BYTES = 16 << 30


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """How the simulated hosts of one process behave.

    A computation holds its devices for `fixed_seconds` when set, else for its per-device FLOPs
    (XLA's cost analysis of the executable, runtime.sim._cost) divided by `flops_per_s`.
    `data_limit_bytes` bounds the data an array may keep on a host (larger arrays are shapes only).
    `execution_deadline_s` bounds how long a computation on a slice spanning hosts waits for the
    slice's other hosts before it is reported hung (0: forever); `input_timeout_s` how long an
    execution waits for its inputs. Each host remembers its last `timeline_length` executions
    (fewer than a real host: a process holds hundreds of hosts).
    """

    devices_per_host: int = 4
    flops_per_s: float = DEFAULT_FLOPS_PER_S
    fixed_seconds: float | None = None
    data_limit_bytes: int = DEFAULT_DATA_LIMIT_BYTES
    device_memory_bytes: int = DEFAULT_DEVICE_MEMORY_BYTES
    execution_deadline_s: float = 30.0
    input_timeout_s: float = 600.0
    timeline_length: int = 20_000  # executions a host remembers (GetTimeline), per host

    def __post_init__(self) -> None:
        if self.devices_per_host <= 0:
            raise ValueError("a simulated host needs at least one device")
        if self.flops_per_s <= 0:
            raise ValueError("flops_per_s must be positive")
        if self.fixed_seconds is not None and self.fixed_seconds < 0:
            raise ValueError("fixed_seconds cannot be negative")

    @property
    def device_kind(self) -> str:
        """What `pathways status` shows as the devices' kind."""
        if self.fixed_seconds is not None:
            return f"sim ({self.fixed_seconds * 1e3:g} ms per computation)"
        return f"sim ({self.flops_per_s:.3g} FLOP/s)"
