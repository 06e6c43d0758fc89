"""The gang scheduler's window, cost estimates and waits: proto.config.SchedulerConfig as this
process's environment sets it (PATHWAYS_<FIELD>, read once at import), as constants. The
scheduler itself reads its settings from the SchedulerConfig it is given whole
(GangScheduler(config=...), which its HostLinks read); these are the same values for code that
wants them as names."""

from proto.config import SchedulerConfig, from_env

_DEFAULTS = from_env(SchedulerConfig)

#: Estimated device seconds of work kept ordered ahead of the slowest host, and the fraction of it
#: below which the window is refilled (refilling in batches keeps Dispatch RPCs, which cost the
#: hosts' executors time, to a few per window rather than one per execution).
WINDOW_S = _DEFAULTS.window_s
REFILL_BELOW = _DEFAULTS.refill_below
#: Most executions ordered ahead of the slowest host, whatever their estimates; and the fewest,
#: whatever their estimates: the next execution is on the hosts before the running one ends (with
#: one, a long step's next computation would wait a round trip through the controller).
MAX_OUTSTANDING = _DEFAULTS.max_outstanding
MIN_OUTSTANDING = _DEFAULTS.min_outstanding
#: Estimate for an executable not measured yet, and the least any execution is counted as.
DEFAULT_COST_S = _DEFAULTS.default_cost_s
MIN_COST_S = _DEFAULTS.min_cost_s
#: Weight of a new measurement in an executable's running cost estimate.
COST_SMOOTHING = _DEFAULTS.cost_smoothing
#: When the island has made no progress for this long (or 4x the oldest pending estimate), one
#: more execution is ordered past the window: work blocked on another island's transfer must not
#: hold up the transfers it waits for.
STALL_S = _DEFAULTS.stall_s
#: Measurements kept for executions whose hosts have not reported yet.
MAX_UNMEASURED = _DEFAULTS.max_unmeasured
#: How long an instruction may wait at the head of its client's queue for inputs that do not exist
#: yet, when its request has no earlier deadline.
INPUT_WAIT_S = _DEFAULTS.input_wait_s
