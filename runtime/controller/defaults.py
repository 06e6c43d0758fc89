"""The controller's timeouts and bounds: proto.config.ControllerConfig as this process's
environment sets it (PATHWAYS_<FIELD>, read once at import), under the names the controller's
modules use."""

from proto.config import ControllerConfig, from_env

_DEFAULTS = from_env(ControllerConfig)

#: Liveness probes: interval, and misses before a host is declared lost (detection < 2 s).
HEARTBEAT_INTERVAL_S = _DEFAULTS.heartbeat_interval_s

HEARTBEAT_MISSES = _DEFAULTS.heartbeat_misses
BUSY_HOST_TIMEOUT_S = _DEFAULTS.busy_host_timeout_s

#: Deadline for hosts to receive a slice definition before CreateSlice returns.
SLICE_FLUSH_TIMEOUT_S = _DEFAULTS.slice_flush_timeout_s

#: Back-pressure: most instructions an island's order may run ahead of its slowest host, and how
#: long a client's commands wait for it to catch up.
MAX_BACKLOG = _DEFAULTS.max_backlog
BACKLOG_TIMEOUT_S = _DEFAULTS.backlog_timeout_s

#: A request waiting for its turn in an island's order is ordered at once this long before the
#: client's deadline (its commands would otherwise be lost to the deadline).
ORDER_DEADLINE_MARGIN_S = _DEFAULTS.order_deadline_margin_s

#: Most cross-island transfers remembered per source island (to fail them if it is lost).
MAX_INCOMING = _DEFAULTS.max_incoming

#: Most slices and executables remembered as dropped by an island restart (to say why they are
#: gone when a client uses one).
DROPPED_REMEMBERED = _DEFAULTS.max_dropped_remembered

#: Deadline of the pings `status` sends to every host.
STATUS_PING_TIMEOUT_S = _DEFAULTS.status_ping_timeout_s
