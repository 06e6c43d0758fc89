"""Resource manager (islands, hosts, virtual slices) and per-island gang schedulers."""

# The scheduler raises the runtime's exceptions. Importing the runtime package first keeps the
# import order acyclic when a program imports `scheduler` before `runtime`.
import runtime  # noqa: F401  (import order, see above)
from scheduler._gang import GangScheduler, OrderTicket
from scheduler._policy import (POLICIES, FifoPolicy, ProportionalSharePolicy, SchedulingPolicy,
                               Tenant, check_weight, make_policy)
from scheduler._readiness import Readiness
from scheduler._resources import HostRecord, ResourceManager, SliceRecord, validate_mesh

__all__ = ["POLICIES", "FifoPolicy", "GangScheduler", "HostRecord", "OrderTicket",
           "ProportionalSharePolicy", "Readiness", "ResourceManager", "SchedulingPolicy",
           "SliceRecord", "Tenant", "check_weight", "make_policy", "validate_mesh"]
