"""Channels to a runtime server: a host started again on the address of one that went away is
reachable at once by a new channel, while an old channel to the gone host is still open."""

from concurrent import futures

import grpc

from proto import rpc as _rpc

_METHOD = "/test.Echo/Call"


def _serve(port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, _: request)}),))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def test_a_host_started_again_on_the_same_address_is_reached_by_a_new_channel():
    server, port = _serve()
    address = f"127.0.0.1:{port}"
    old = _rpc.open_channel(address)
    try:
        assert old.unary_unary(_METHOD)(b"a", timeout=5) == b"a"
        server.stop(None).wait(5)
        for _ in range(2):  # the old channel sees the host gone and backs off before retrying
            try:
                old.unary_unary(_METHOD)(b"b", timeout=0.5)
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED)
        again, same_port = _serve(port)
        try:
            assert same_port == port
            with _rpc.open_channel(address) as fresh:
                # With grpc's process-wide subchannel pool this failed at once: UNAVAILABLE,
                # "Connection refused", the old channel's backoff shared.
                assert fresh.unary_unary(_METHOD)(b"c", timeout=5) == b"c"
        finally:
            again.stop(None).wait(5)
    finally:
        old.close()
