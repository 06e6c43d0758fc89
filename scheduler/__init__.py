"""Resource manager (islands, hosts, virtual slices) and per-island gang schedulers.

Runs in the controller process. Imports only the floor (proto/), never runtime/."""

from scheduler.gang import GangScheduler
from scheduler.policy import (POLICIES, FifoPolicy, ProportionalSharePolicy, SchedulingPolicy,
                              Tenant, check_weight, make_policy)
from scheduler.readiness import Readiness
from scheduler.resources import HostRecord, ResourceManager, SliceRecord, validate_mesh
from scheduler.tickets import OrderTicket

__all__ = ["POLICIES", "FifoPolicy", "GangScheduler", "HostRecord", "OrderTicket",
           "ProportionalSharePolicy", "Readiness", "ResourceManager", "SchedulingPolicy",
           "SliceRecord", "Tenant", "check_weight", "make_policy", "validate_mesh"]
