"""The controller's timeouts and bounds (their defaults)."""

#: Liveness probes: interval, and misses before a host is declared lost (detection < 2 s).
HEARTBEAT_INTERVAL_S = 0.5

HEARTBEAT_MISSES = 2
BUSY_HOST_TIMEOUT_S = 30.0

#: Deadline for hosts to receive a slice definition before CreateSlice returns.
SLICE_FLUSH_TIMEOUT_S = 10.0

#: Back-pressure: most instructions an island's order may run ahead of its slowest host, and how
#: long a client's commands wait for it to catch up.
MAX_BACKLOG = 4096
BACKLOG_TIMEOUT_S = 120.0

#: A request waiting for its turn in an island's order is ordered at once this long before the
#: client's deadline (its commands would otherwise be lost to the deadline).
ORDER_DEADLINE_MARGIN_S = 2.0

#: Most cross-island transfers remembered per source island (to fail them if it is lost).
MAX_INCOMING = 4096

#: Deadline of the pings `status` sends to every host.
STATUS_PING_TIMEOUT_S = 1.0
