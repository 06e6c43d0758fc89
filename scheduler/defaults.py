"""The gang scheduler's window, cost estimates and waits (their defaults)."""

#: Estimated device seconds of work kept ordered ahead of the slowest host, and the fraction of it
#: below which the window is refilled (refilling in batches keeps Dispatch RPCs, which cost the
#: hosts' executors time, to a few per window rather than one per execution).
WINDOW_S = 0.05
REFILL_BELOW = 0.5
#: Most executions ordered ahead of the slowest host, whatever their estimates; and the fewest,
#: whatever their estimates: the next execution is on the hosts before the running one ends (with
#: one, a long step's next computation would wait a round trip through the controller).
MAX_OUTSTANDING = 4096
MIN_OUTSTANDING = 2
#: Estimate for an executable not measured yet, and the least any execution is counted as.
DEFAULT_COST_S = 1e-3
MIN_COST_S = 1e-5
#: Weight of a new measurement in an executable's running cost estimate.
COST_SMOOTHING = 0.2
#: When the island has made no progress for this long (or 4x the oldest pending estimate), one
#: more execution is ordered past the window: work blocked on another island's transfer must not
#: hold up the transfers it waits for.
STALL_S = 0.5
#: Measurements kept for executions whose hosts have not reported yet.
MAX_UNMEASURED = 16384
#: How long an instruction may wait at the head of its client's queue for inputs that do not exist
#: yet, when its request has no earlier deadline (proto.limits.Limits.input_wait_s).
INPUT_WAIT_S = 120.0
