"""The servers' face, for those who run or embed them (the CLI, the launchers, tests).

A user program needs only `runtime` (the client, clusters and errors); this module names the
pieces a server author composes: the controller and worker objects, the gRPC servers that serve
them, and the one-process helpers that wait for hosts or register them.
"""

from proto.config import ClusterConfig
from runtime.controller.controller import Controller
from runtime.controller.servicer import create_controller_server
from runtime.worker.servicer import create_worker_server
from runtime.worker.worker import Worker

__all__ = ["Controller", "Worker", "controller_options", "create_controller_server",
           "create_worker_server", "worker_options"]


def controller_options(config: ClusterConfig) -> dict:
    """The Controller's keyword arguments a cluster's settings give (proto.config)."""
    c = config.controller
    return dict(policy=c.policy, session_quota_bytes=c.session_quota_bytes,
                session_lease_s=c.session_lease_s, scheduler_config=config.scheduler)


def worker_options(config: ClusterConfig) -> dict:
    """The Worker's keyword arguments a cluster's settings give (proto.config)."""
    w = config.worker
    return dict(input_timeout_s=w.input_timeout_s, execution_deadline_s=w.execution_deadline_s)
