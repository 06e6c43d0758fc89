"""The Controller gRPC service, and the server that carries it."""

from __future__ import annotations

import hashlib

import grpc

from proto import access
from proto import auth as _auth
from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from proto.admission import Admission, Chain
from proto.errors import PathwaysError, abort
from runtime.controller import visibility as _visibility
from runtime.controller.controller import Controller
from runtime.controller.defaults import ORDER_DEADLINE_MARGIN_S
from runtime.controller.sessions import ID_BITS, session_policy
from runtime.metrics import CountingInterceptor


class ControllerServicer(pb_grpc.ControllerServicer):
    """gRPC face of a Controller: every handler maps runtime exceptions to status codes."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except PathwaysError as exc:
            abort(context, exc)

    def Connect(self, request, context):
        session = self._call(context, self.controller.connect, request.client_name,
                             request.weight)
        return pb.ConnectReply(session_id=session.session_id,
                               id_base=session.session_id << ID_BITS, id_range=1 << ID_BITS,
                               session_key=self.controller.session_key(session.session_id),
                               lease_s=self.controller.leases.lease_s)

    def KeepAlive(self, request, context):
        # The guard has checked the session's key and renewed its lease (session_policy).
        return pb.KeepAliveReply(lease_s=self.controller.leases.lease_s)

    def Disconnect(self, request, context):
        self._call(context, self.controller.disconnect, request.session_id)
        return pb.DisconnectReply()

    def RegisterHost(self, request, context):
        self._call(context, self.controller.health.register_host, request.host)
        return pb.RegisterHostReply()

    def UnregisterHost(self, request, context):
        self._call(context, self.controller.health.unregister_host, request.island, request.host,
                   request.address)
        return pb.UnregisterHostReply()

    def GetStatus(self, request, context):
        controller = self.controller
        return controller.status_report.status(_visibility.viewer(
            context, controller.controller_id, controller.credentials.host_token))

    def CreateSlice(self, request, context):
        info = self._call(context, self.controller.catalog.create_slice, request.session_id,
                          list(request.mesh_shape), list(request.axis_names), request.island,
                          request.devices)
        return pb.CreateSliceReply(slice=info)

    def ReleaseSlice(self, request, context):
        self._call(context, self.controller.catalog.release_slice, request.session_id,
                   request.slice_id)
        return pb.ReleaseSliceReply()

    def LoadExecutable(self, request, context):
        exe = self._call(context, self.controller.catalog.load_executable, request)
        return pb.LoadExecutableReply(executable_id=exe.executable_id,
                                      fingerprint=hashlib.sha256(request.serialized).hexdigest())

    def RegisterProgram(self, request, context):
        program_id = self._call(context, self.controller.register_program, request)
        return pb.RegisterProgramReply(program_id=program_id)

    def RegisterArrays(self, request, context):
        with self.controller.leases.call(request.session_id):  # may wait for the island's order
            sequence = self._call(context, self.controller.register_arrays, request.session_id,
                                  request.arrays, _order_budget(context))
        return pb.RegisterArraysReply(sequence=sequence)

    def Execute(self, request, context):
        with self.controller.leases.call(request.session_id):  # may wait for the client's turn
            results = self._call(context, self.controller.execute, request.session_id,
                                 request.commands, _order_budget(context))
        return pb.ExecuteReply(results=results)

    def DeleteArrays(self, request, context):
        self._call(context, self.controller.delete_arrays, request.session_id, request.array_ids)
        return pb.DeleteArraysReply()

def _order_budget(context) -> float | None:
    """How long a request may wait for its turn in the order: its deadline, less a margin."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left - ORDER_DEADLINE_MARGIN_S)

#: Calls only the cluster's own hosts may make (they need the host token, when there is one).
HOST_METHODS = access.methods_requiring(access.CONTROLLER, access.Credential.HOST)

#: Client calls bounded per session and in all (proto.admission): those that may wait (for
#: their turn in an island's order, for hosts) and hold a thread meanwhile.
LIMITED_METHODS = ("CreateSlice", "ReleaseSlice", "LoadExecutable", "RegisterArrays", "Execute",
                   "RegisterProgram", "DeleteArrays", "GetStatus")

def create_controller_server(controller: Controller, address: str = "127.0.0.1:0", *,
                             max_workers: int = 64) -> tuple[grpc.Server, int]:
    """A started gRPC server for `controller` on `address` (port 0 picks one): (server, port).

    It demands the controller's credentials (proto.auth): the cluster token on every call, the
    host token on HOST_METHODS, a session's key on every call naming that session; TLS when the
    credentials have it. Requests out of the controller's limits are refused before any handler
    runs (proto.limits)."""
    credentials = controller.credentials
    limits = controller.limits
    guard = _auth.ServerGuard(credentials.token, host_token=credentials.host_token,
                              host_methods=HOST_METHODS, authorize=session_policy(controller),
                              screen=lambda method, request: _limits.check_request(
                                  limits, method, request))
    guard = CountingInterceptor(guard, "controller")
    servicer = ControllerServicer(controller)
    admission = Admission("controller", LIMITED_METHODS, limits,
                          lambda: controller.controller_id, credentials.host_token,
                          per_session=limits.calls_per_session)
    controller.admission = admission
    return _rpc.start_server(
        "controller", address, credentials, Chain(guard, admission),
        lambda server: pb_grpc.add_ControllerServicer_to_server(servicer, server),
        max_workers=max_workers)
