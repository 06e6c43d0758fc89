"""A simulated platform: hosts that serve the Worker protocol on devices that execute nothing.

A simulated host takes the island's order from the controller over the real gRPC protocol, runs it
strictly in sequence, and holds its devices for each computation's duration (XLA's cost analysis
of the executable at a set FLOP/s, or a fixed duration) on an asyncio timer, using no CPU
meanwhile. A computation on a slice spanning hosts starts only when every host of the slice has
reached it at the same place in the order, so an order broken across hosts hangs, and is reported
hung past the execution deadline, as on real devices. Arrays are shapes, with data only when
small (runtime.sim._arrays says what a read returns).

One process serves every host of whole islands (`pathways worker --platform sim`), each host with
its own address and registration; `SimCluster` (`pathways up --platform sim`) starts a controller
and a few such processes. That lets one controller drive a thousand hosts on one machine, and
measures the runtime's own overhead on devices that do not share the CPU with it.
"""

from runtime.sim._cluster import SimCluster
from runtime.sim._config import SimConfig
from runtime.sim._cost import CostModel, per_device_flops
from runtime.sim._host import SimHost
from runtime.sim._process import SimIslands, add_arguments, raise_file_limit, run_worker
from runtime.sim._service import start_sim_server

__all__ = ["CostModel", "SimCluster", "SimConfig", "SimHost", "SimIslands", "add_arguments",
           "per_device_flops", "raise_file_limit", "run_worker", "start_sim_server"]
