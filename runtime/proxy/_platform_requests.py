"""Requests about the platform rather than arrays: init, default device assignment and layout."""

from __future__ import annotations

import numpy as np

from proto.errors import InvalidArgumentError
from proto.ifrt import ifrt_service_pb2 as ifrt
from proto.ifrt import xla_pb2
from runtime.proxy._devices import MEMORY_KIND, RUNTIME_TYPE
from runtime.proxy._dtypes import numpy_dtype
from runtime.proxy._session import Session, handles
from runtime.proxy._status import UnimplementedError

PLATFORM_VERSION = "pathways-runtime"


@handles("init_request")
def init(session: Session, request: ifrt.InitRequest) -> ifrt.InitResponse:
    """The islands' devices and memories (runtime.proxy._devices)."""
    response = ifrt.InitResponse(
        session_id=session.id, platform_name=session.devices.platform,
        platform_version=PLATFORM_VERSION, platform_id=0, process_index=0,
        runtime_type=RUNTIME_TYPE)
    session.devices.fill_init(response)
    return response


@handles("get_default_device_assignment_request")
def default_device_assignment(session: Session, request: ifrt.GetDefaultDeviceAssignmentRequest
                              ) -> ifrt.GetDefaultDeviceAssignmentResponse:
    """The first replicas x partitions devices of the first island that has that many."""
    replicas, partitions = request.num_replicas, request.num_partitions
    needed = replicas * partitions
    by_island: dict[int, list[int]] = {}
    for device in session.devices.devices:
        by_island.setdefault(device.island, []).append(device.id)
    chosen = next((ids for _, ids in sorted(by_island.items()) if len(ids) >= needed), None)
    if needed == 0 or chosen is None:
        raise InvalidArgumentError(f"no island has {replicas} x {partitions} devices (islands: "
                                   f"{', '.join(str(len(v)) for v in by_island.values())})")
    ids = np.asarray(chosen[:needed]).reshape(replicas, partitions)
    assignment = xla_pb2.DeviceAssignmentProto(replica_count=replicas,
                                               computation_count=partitions)
    for p in range(partitions):
        assignment.computation_devices.add(replica_device_ids=ids[:, p].tolist())
    return ifrt.GetDefaultDeviceAssignmentResponse(device_assignment=assignment)


@handles("get_default_layout_request")
def default_layout(session: Session, request: ifrt.GetDefaultLayoutRequest
                   ) -> ifrt.GetDefaultLayoutResponse:
    """Dense row-major: the only layout the runtime's hosts hold arrays in."""
    numpy_dtype(request.dtype)  # an unsupported dtype fails here
    session.devices[request.device_id]
    if request.memory_kind not in ("", MEMORY_KIND):
        raise UnimplementedError(f"memory kind {request.memory_kind!r} is not supported by the "
                                 f"proxy (only {MEMORY_KIND!r})")
    order = ",".join(str(d) for d in reversed(range(len(request.dims))))
    return ifrt.GetDefaultLayoutResponse(serialized_pjrt_layout=f"{{{order}}}".encode())
