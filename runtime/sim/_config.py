"""Settings of a simulated host: proto.config.SimConfig (where every tunable lives), and its
defaults as this process's environment sets them (PATHWAYS_<FIELD>, read once at import)."""

from __future__ import annotations

from proto.config import SimConfig, from_env

__all__ = ["SimConfig", "DEFAULT_FLOPS_PER_S"]

#: Default speed of one simulated device (FLOP/s).
DEFAULT_FLOPS_PER_S = from_env(SimConfig).flops_per_s
