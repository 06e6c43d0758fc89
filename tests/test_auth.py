"""Authentication: the cluster token on every call, token files, session keys, TLS, and request
bytes that do not parse."""

from __future__ import annotations

import os
import stat
from concurrent import futures

import grpc
import pytest

from certs import needs_openssl, self_signed
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import auth as _auth
from proto import rpc as _rpc
from proto import wire as _wire
from runtime.controller.controller import Controller
from runtime.controller.servicer import ControllerServicer
from proto.errors import FailedPreconditionError


@pytest.fixture
def guarded():
    """A controller behind a ServerGuard with a token, on loopback: (address, token)."""
    token = _auth.generate_token()
    controller = Controller(heartbeat=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_wire.GRPC_OPTIONS,
                         interceptors=[_auth.ServerGuard(token)])
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", token
    server.stop(None)
    controller.close()


def _status(address: str, credentials: _auth.Credentials | None) -> pb.GetStatusReply:
    with _rpc.open_channel(address, credentials) as channel:
        return pb_grpc.ControllerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)


def test_calls_without_the_token_are_unauthenticated(guarded):
    address, token = guarded
    for wrong in (None, "", token[:-1], token + "x", "x" * 5000):
        with pytest.raises(grpc.RpcError) as info:
            _status(address, _auth.Credentials(wrong))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _status(address, _auth.Credentials(token)).sessions == 0
    with _rpc.open_channel(address, _auth.Credentials(token)) as channel:  # streams too
        stub = pb_grpc.ControllerStub(channel)
        reply = stub.Connect(pb.ConnectRequest(client_name="c"), timeout=5)
        assert reply.session_id > 0


def test_unparseable_requests_are_invalid_argument(guarded):
    address, token = guarded
    with _rpc.open_channel(address, _auth.Credentials(token)) as channel:
        for raw in (b"\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11, os.urandom(64)):
            call = channel.unary_unary("/pathways.Controller/Connect")
            try:
                call(raw, timeout=5)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, err)
        # and the server still serves
        stub = pb_grpc.ControllerStub(channel)
        assert stub.Connect(pb.ConnectRequest(client_name="c"), timeout=5).session_id > 0


def test_token_file_is_private_and_checked(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "token")
    token = _auth.generate_token()
    assert len(token) >= 40 and token != _auth.generate_token()
    _auth.write_token_file(path, token)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _auth.read_token_file(path) == token
    os.chmod(path, 0o644)
    with pytest.raises(FailedPreconditionError, match="chmod 600"):
        _auth.read_token_file(path)
    os.chmod(path, 0o600)
    monkeypatch.delenv(_auth.TOKEN_ENV, raising=False)
    monkeypatch.delenv(_auth.TOKEN_FILE_ENV, raising=False)
    assert _auth.resolve_token() is None
    monkeypatch.setenv(_auth.TOKEN_FILE_ENV, path)
    assert _auth.resolve_token() == token
    monkeypatch.setenv(_auth.TOKEN_ENV, "from-env")
    assert _auth.resolve_token() == "from-env"
    assert _auth.resolve_token(token_file=path) == token
    assert _auth.resolve_token("explicit", path) == "explicit"


def test_session_keys():
    key = _auth.session_key("secret", 7)
    assert _auth.check_session_key("secret", key) == 7
    assert _auth.check_session_key("other", key) is None
    assert _auth.check_session_key("secret", "8" + key[1:]) is None
    flipped = key[:-1] + ("0" if key[-1] != "0" else "1")
    assert _auth.check_session_key("secret", flipped) is None
    for junk in ("", ":", "x:y", "7", "9" * 40 + ":00"):
        assert _auth.check_session_key("secret", junk) is None
    assert _auth.check_session_key("", key) is None
    assert _auth.is_earlier_controller_key("restarted", key)
    assert not _auth.is_earlier_controller_key("secret", flipped)
    policy = _auth.session_policy(lambda: "restarted")
    with pytest.raises(FailedPreconditionError, match="restarted"):
        policy("Execute", pb.ExecuteRequest(session_id=7), key, False)


def test_loopback_addresses():
    assert _rpc.is_loopback("127.0.0.1:5") and _rpc.is_loopback("localhost:1")
    assert _rpc.is_loopback("[::1]:80") and _rpc.is_loopback("127.3.4.5:0")
    assert not _rpc.is_loopback("0.0.0.0:5") and not _rpc.is_loopback("10.0.0.1:5")


@needs_openssl
def test_tls_with_token(tmp_path):
    key, cert = self_signed(tmp_path)
    token = _auth.generate_token()
    controller = Controller(heartbeat=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[_auth.ServerGuard(token)])
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server)
    server_side = _auth.Credentials(token, _auth.TLSConfig(cert=cert, key=key))
    port = _rpc.add_port(server, "127.0.0.1:0", server_side)
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        client_side = _auth.Credentials(token, _auth.TLSConfig(ca=cert))
        assert _status(address, client_side).sessions == 0
        with pytest.raises(grpc.RpcError) as info:  # plain text to a TLS port
            _status(address, _auth.Credentials(token))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
        controller.close()


def test_host_token_and_array_owner_policy():
    """A host serves Dispatch only to holders of the host token, and an array only to its
    session (or a peer host)."""
    import jax

    from runtime.worker.servicer import WorkerServicer
    from runtime.worker.worker import Worker

    credentials = _auth.Credentials.generate()
    worker = Worker(0, 0, jax.devices()[:1])
    guard = _auth.ServerGuard(credentials.token, host_token=credentials.host_token,
                              host_methods=("Dispatch",),
                              authorize=_auth.array_owner_policy(lambda: worker._controller_id))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[guard])
    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(worker), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    secret = "controller-secret"
    owned = (3 << _auth.ID_BITS) + 1
    try:
        dispatch = pb.DispatchRequest(controller_id=secret)
        with _rpc.open_channel(address, credentials.for_clients()) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.WorkerStub(channel).Dispatch(dispatch, timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with _rpc.open_channel(address, credentials) as channel:
            pb_grpc.WorkerStub(channel).Dispatch(dispatch, timeout=5)
        for session, code in ((2, grpc.StatusCode.PERMISSION_DENIED),
                              (3, grpc.StatusCode.NOT_FOUND)):
            key = [(_auth.SESSION_KEY, _auth.session_key(secret, session))]
            with _rpc.open_channel(address, credentials.for_clients(), key) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    list(pb_grpc.WorkerStub(channel).GetArray(
                        pb.GetArrayRequest(array_id=owned, timeout_s=0.1), timeout=5))
                assert info.value.code() == code, session
    finally:
        server.stop(None)
        worker.stop()
