"""The servers' face, for those who run or embed them (the CLI, the launchers, tests).

A user program needs only `runtime` (the client, clusters and errors); this module names the
pieces a server author composes: the controller and worker objects, the gRPC servers that serve
them, and the one-process helpers that wait for hosts or register them.
"""

from runtime.controller.controller import Controller
from runtime.controller.servicer import create_controller_server
from runtime.worker.servicer import create_worker_server
from runtime.worker.worker import Worker

__all__ = ["Controller", "Worker", "create_controller_server", "create_worker_server"]
