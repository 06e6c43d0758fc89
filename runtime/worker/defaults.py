"""The worker host's timeouts and bounds: proto.config.WorkerConfig as this process's environment
sets it (PATHWAYS_<FIELD>, read once at import), under the names the host's modules use."""

from proto.config import WorkerConfig, from_env

#: This process's worker settings, whole (the environment's overrides applied).
SETTINGS = from_env(WorkerConfig)

#: How long an execution waits for its inputs before failing. Inputs may come from another island
#: that is still compiling or computing its part of a program (PaLM's first step compiles both
#: components on every island), so this is minutes, not seconds.
INPUT_TIMEOUT_S = SETTINGS.input_timeout_s

#: How long a put waits for the controller's definition of the array's slice to arrive.
SLICE_TIMEOUT_S = SETTINGS.slice_timeout_s

#: How long a put waits for the controller's announcement of its array (the client sends it once
#: the controller has ordered the announcement, which may still be on its way to this host).
ANNOUNCE_TIMEOUT_S = SETTINGS.announce_timeout_s

#: Failures of incoming arrays remembered until their announcement arrives.
MAX_FAILED_EARLY = SETTINGS.max_failed_early

#: Arrivals of announced arrays kept for the progress stream (the controller lets computations
#: that read a put into the order once every host of the put has reported it).
ARRIVALS_KEPT = SETTINGS.arrivals_kept

#: Deadline for streaming one array to another host.
TRANSFER_TIMEOUT_S = SETTINGS.transfer_timeout_s

#: Longest wait a GetArray may ask for, and how often a waiting one checks its caller is there.
MAX_GET_TIMEOUT_S = SETTINGS.max_get_timeout_s
CALLER_CHECK_S = SETTINGS.caller_check_s

#: Longest a computation on a multi-host slice may wait for the slice's other hosts to reach it
#: (0: forever). Past it the computation is reported hung (runtime.worker.hang).
EXECUTION_DEADLINE_S = SETTINGS.execution_deadline_s
