"""Program requests: compile, executable metadata, execute, cost analysis, program text, destruct."""

from __future__ import annotations

import weakref

from proto.errors import NotFoundError
from proto.ifrt import ifrt_programs_pb2 as ifrt
from proto.ifrt import status_pb2, types_pb2
from runtime.proxy._arrays import ProxyArray, find, remote_of, wait_ready
from runtime.proxy._devices import MEMORY_KIND
from runtime.proxy._dtypes import dtype_proto
from runtime.proxy._programs import Executable, check_devices, compile_program, cost_attributes
from runtime.proxy._session import Later, Session, handles
from runtime.proxy._status import UnimplementedError, status_of


def _executable(session: Session, handle: int) -> Executable:
    executable = session.executables.get(handle)
    if executable is None:
        raise NotFoundError(f"loaded executable {handle} is unknown")
    return executable


@handles("compile_request")
def compile_(session: Session, request: ifrt.CompileRequest) -> Later:
    """Analyses and loads a program (runtime.proxy._programs) off the session's thread: the next
    requests go on meanwhile."""
    def load() -> ifrt.CompileResponse:
        executable = compile_program(session, request.program, request.compile_options,
                                     request.host_callbacks)
        handle = session.new_handle()
        session.executables[handle] = executable
        return ifrt.CompileResponse(
            loaded_executable_handle=handle, name=executable.name,
            num_devices=len(executable.devices), device_ids=executable.devices,
            addressable_device_ids=executable.devices,
            fingerprint_value=executable.analysis.fingerprint,
            ready_future_handle=session.add_future())
    return Later(load)


@handles("loaded_executable_metadata_request")
def metadata(session: Session, request: ifrt.LoadedExecutableMetadataRequest
             ) -> ifrt.LoadedExecutableMetadataResponse:
    """Shardings, layouts, memory kinds and donations, as the analysis compile found them."""
    executable = _executable(session, request.loaded_executable_handle)
    analysis = executable.analysis
    response = ifrt.LoadedExecutableMetadataResponse(
        size_of_generated_code_in_bytes=analysis.executable.size_of_generated_code_in_bytes())
    response.parameter_shardings.shardings.extend(analysis.parameter_shardings)
    response.output_shardings.shardings.extend(analysis.output_shardings)
    response.parameter_layouts_list.layouts.extend(analysis.parameter_layouts)
    response.output_layouts_list.layouts.extend(analysis.output_layouts)
    # One list per computation (there is one), of each output's memory kind.
    response.output_memory_kinds.memory_kind_lists.add(
        memory_kinds=[MEMORY_KIND] * len(analysis.output_shardings))
    response.donated_input_indices.donated_input_indices.extend(analysis.signature.donated)
    response.compiled_memory_stats_error.CopyFrom(status_of(UnimplementedError(
        "compiled memory statistics are not reported by the proxy")))
    return response


@handles("loaded_executable_execute_request", lambda r: list(r.result_array_handle))
def execute(session: Session, request: ifrt.LoadedExecutableExecuteRequest
            ) -> ifrt.LoadedExecutableExecuteResponse:
    """Queues one call with the controller and answers at once: the outputs exist as handles
    before the computation has run, as in the client API; their reads wait for it."""
    executable = _executable(session, request.loaded_executable_handle)
    check_devices(executable, request.device_ids)
    arrays = [find(session, h) for h in request.args_handles]
    if len(arrays) != len(executable.in_layouts):
        raise UnimplementedError(f"{executable.name} takes {len(executable.in_layouts)} "
                                 f"arguments, {len(arrays)} given")
    refused = set(request.execute_options.non_donatable_input_indices) & set(
        executable.function.donated)
    if refused:
        raise UnimplementedError(f"{executable.name} donates inputs {sorted(refused)}, which "
                                 f"this call may not donate: not supported by the proxy")
    outputs = executable.function(*[remote_of(session, a) for a in arrays])
    results = [ProxyArray(aval.dtype, tuple(aval.shape), layout, remote)
               for aval, layout, remote in zip(executable.out_avals, executable.out_layouts,
                                               outputs)]
    response = ifrt.LoadedExecutableExecuteResponse()
    given = list(request.result_array_handle)
    for i, result in enumerate(results):
        handle = given[i] if given else session.new_handle()
        session.arrays[handle] = result
        if not given:
            response.outputs.add(dtype=dtype_proto(result.dtype),
                                 shape=types_pb2.ShapeProto(dims=result.shape),
                                 sharding=result.layout.sharding_proto(), array_handle=handle)
    if request.execute_options.fill_status:
        watched = [weakref.ref(r) for r in results]

        def finished() -> None:  # the outputs computed (or dropped by the client meanwhile)
            live = [r for r in (ref() for ref in watched) if r is not None and not r.deleted]
            if live:
                wait_ready(session, live)
        response.status_handle = session.add_future(finished, request.result_status_handle)
    return response


@handles("loaded_executable_cost_analysis_request")
def cost_analysis(session: Session, request: ifrt.LoadedExecutableCostAnalysisRequest
                  ) -> ifrt.LoadedExecutableCostAnalysisResponse:
    executable = _executable(session, request.loaded_executable_handle)
    try:
        return ifrt.LoadedExecutableCostAnalysisResponse(attributes=cost_attributes(executable))
    except Exception as exc:  # XLA has no analysis for this program
        return ifrt.LoadedExecutableCostAnalysisResponse(status=status_pb2.StatusProto(
            code=12, message=f"no cost analysis: {exc}"))


@handles("loaded_executable_human_readable_program_text_request")
def program_text(session: Session, request: ifrt.LoadedExecutableHumanReadableProgramTextRequest
                 ) -> ifrt.LoadedExecutableHumanReadableProgramTextResponse:
    executable = _executable(session, request.loaded_executable_handle)
    text = "\n".join(m.to_string() for m in executable.analysis.executable.hlo_modules())
    return ifrt.LoadedExecutableHumanReadableProgramTextResponse(human_readable_program_text=text)


@handles("loaded_executable_destruct_request")
def destruct(session: Session, request: ifrt.LoadedExecutableDestructRequest
             ) -> ifrt.LoadedExecutableDestructResponse:
    """Forgets an executable (its compiled code stays on the hosts until the session ends)."""
    _executable(session, request.loaded_executable_handle)
    del session.executables[request.loaded_executable_handle]
    return ifrt.LoadedExecutableDestructResponse()
