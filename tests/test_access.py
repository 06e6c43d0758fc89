"""The access table (proto.access): one row per RPC of both services, read by both servers."""

import pytest

from proto import access
from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto.errors import PermissionDeniedError


def _methods(service: str):
    return pb.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods


@pytest.mark.parametrize("service", [access.CONTROLLER, access.WORKER])
def test_every_method_of_the_service_has_one_row(service):
    assert set(access.REQUIRED[service]) == {m.name for m in _methods(service)}


def test_session_rows_are_exactly_the_requests_that_name_a_session():
    naming = {m.name for m in _methods(access.CONTROLLER)
              if "session_id" in m.input_type.fields_by_name}
    assert access.methods_requiring(access.CONTROLLER, access.Credential.SESSION) == naming


def test_both_servers_take_their_host_methods_from_the_table():
    from runtime.controller.servicer import HOST_METHODS as controller_host
    from runtime.worker.servicer import HOST_METHODS as worker_host

    assert controller_host == {"RegisterHost", "UnregisterHost"}
    assert worker_host == {"Dispatch", "WatchProgress"}


def test_the_policies_follow_the_table():
    session = _auth.session_policy(lambda: "secret")
    with pytest.raises(PermissionDeniedError):
        session("Execute", pb.ExecuteRequest(session_id=3), None, False)
    session("Connect", pb.ConnectRequest(), None, False)  # TOKEN: nothing more asked
    owner = _auth.array_owner_policy(lambda: "secret", wait_s=0.0)
    with pytest.raises(PermissionDeniedError, match="array 5 belongs to another session"):
        owner("GetArray", pb.GetArrayRequest(array_id=5), None, False)
    owner("GetArray", pb.GetArrayRequest(array_id=5), None, True)  # a peer host
    owner("Ping", pb.PingRequest(), None, False)
    # What an event loop's handler may decide without leaving the loop: all but a key that
    # does not check out (which may be an earlier controller's, worth waiting for).
    mine = pb.GetArrayRequest(array_id=(3 << _auth.ID_BITS) + 5)
    key = _auth.session_key("secret", 3)
    assert owner.at_once("GetArray", mine, key, False)
    owner("GetArray", mine, key, False)
    assert not owner.at_once("GetArray", mine, _auth.session_key("secret", 4), False)
    assert not owner.at_once("GetArray", mine, None, False)
    assert owner.at_once("GetArray", mine, None, True) and owner.at_once("Ping", None, None, False)
