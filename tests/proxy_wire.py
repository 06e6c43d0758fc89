"""A bare IFRT proxy client for tests: speaks the protocol with the project's own generated
modules, so the proxy server's answers can be checked message by message, without JAX."""

from __future__ import annotations

import itertools
import queue
import threading

import grpc

from proto.ifrt import grpc_ifrt_service_pb2 as grpc_ifrt
from proto.ifrt import grpc_ifrt_service_pb2_grpc as ifrt_grpc
from proto.ifrt import ifrt_service_pb2 as ifrt
from proto.ifrt import types_pb2
from runtime.proxy._server import (NAME_KEY, PROTOCOL_VERSION, SESSION_METADATA_KEY,
                                   STORE_METADATA_KEY, TOKEN_KEY, WEIGHT_KEY)

TIMEOUT_S = 60.0


class WireSession:
    """One IfrtSession stream: `call(kind, message)` sends a request and returns its response."""

    def __init__(self, address: str, token: str | None, *, name: str = "wire",
                 weight: float = 1.0) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = ifrt_grpc.GrpcIfrtServiceStub(self.channel)
        data = types_pb2.AttributeMapProto()
        data.attributes[NAME_KEY].string_value = name.encode()
        data.attributes[WEIGHT_KEY].string_value = repr(weight).encode()
        if token:
            data.attributes[TOKEN_KEY].string_value = token.encode()
        metadata = grpc_ifrt.GrpcIfrtSessionMetadata(
            version=ifrt.IfrtProxyVersion(protocol_version=PROTOCOL_VERSION,
                                          ifrt_serdes_version_number=3),
            initialization_data=data)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ops = itertools.count(1)
        self._waiting: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._stream = self.stub.IfrtSession(
            iter(self._outbox.get, None),
            metadata=[(SESSION_METADATA_KEY, metadata.SerializeToString())], timeout=TIMEOUT_S * 5)
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session_id = 0

    def _read(self) -> None:
        try:
            for response in self._stream:
                with self._lock:
                    box = self._waiting.pop(response.response_metadata.op_id, None)
                if box is not None:
                    box.put(response)
        except grpc.RpcError as err:
            self.error = err
        with self._lock:
            for box in self._waiting.values():
                box.put(None)

    def send(self, kind: str, message) -> queue.SimpleQueue:
        """Sends a request; returns the box its response lands in."""
        op_id = next(self._ops)
        box: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._waiting[op_id] = box
        request = ifrt.IfrtRequest(request_metadata=ifrt.RequestMetadata(op_id=op_id))
        field = getattr(request, kind)
        if isinstance(message, bytes):
            setattr(request, kind, message)
        else:
            field.CopyFrom(message)
        self._outbox.put(request)
        return box

    def call(self, kind: str, message, timeout: float = TIMEOUT_S) -> ifrt.IfrtResponse:
        response = self.send(kind, message).get(timeout=timeout)
        if response is None:
            raise self.error or RuntimeError("session ended")
        return response

    def init(self) -> ifrt.InitResponse:
        response = self.call("init_request", ifrt.InitRequest()).init_response
        self.session_id = response.session_id
        return response

    def store(self, handle: int, data: bytes, chunk: int = 1 << 16) -> None:
        meta = grpc_ifrt.GrpcHostBufferStoreMetadata(session_id=self.session_id, handle=handle,
                                                buffer_size=len(data))
        chunks = [grpc_ifrt.GrpcHostBufferStoreRequest(data=data[i:i + chunk])
                  for i in range(0, max(len(data), 1), chunk)]
        self.stub.HostBufferStore(iter(chunks), timeout=TIMEOUT_S,
                                  metadata=[(STORE_METADATA_KEY, meta.SerializeToString())])

    def lookup(self, handle: int) -> bytes:
        request = grpc_ifrt.GrpcHostBufferLookupRequest(session_id=self.session_id, handle=handle)
        return b"".join(r.data for r in self.stub.HostBufferLookup(request, timeout=TIMEOUT_S))

    def close(self) -> None:
        self._outbox.put(None)
        self._reader.join(timeout=10)
        self.channel.close()
