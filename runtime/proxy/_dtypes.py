"""IFRT element types as NumPy dtypes, for the types the runtime's wire carries."""

from __future__ import annotations

import numpy as np

from proto import wire as _wire
from proto.ifrt import types_pb2
from runtime.proxy._status import UnimplementedError

_Kind = types_pb2.DTypeProto.Kind
_NAMES = {
    _Kind.KIND_PRED: "bool", _Kind.KIND_S8: "int8", _Kind.KIND_S16: "int16",
    _Kind.KIND_S32: "int32", _Kind.KIND_S64: "int64", _Kind.KIND_U8: "uint8",
    _Kind.KIND_U16: "uint16", _Kind.KIND_U32: "uint32", _Kind.KIND_U64: "uint64",
    _Kind.KIND_F16: "float16", _Kind.KIND_F32: "float32", _Kind.KIND_F64: "float64",
    _Kind.KIND_BF16: "bfloat16", _Kind.KIND_C64: "complex64", _Kind.KIND_C128: "complex128",
}
_KINDS = {name: kind for kind, name in _NAMES.items()}
#: 64-bit types: the hosts' JAX runs without jax_enable_x64, so it would narrow them.
_WIDE = {"int64", "uint64", "float64", "complex128"}


def numpy_dtype(proto: types_pb2.DTypeProto) -> np.dtype:
    """The NumPy dtype of an IFRT dtype; UNIMPLEMENTED for types the runtime does not carry."""
    name = _NAMES.get(proto.kind)
    if name is None:
        kind = _Kind.Name(proto.kind) if proto.kind in _Kind.values() else str(proto.kind)
        raise UnimplementedError(f"dtype {kind} is not supported by the proxy")
    if name in _WIDE:
        raise UnimplementedError(f"64-bit dtype {name} is not supported by the proxy (the "
                                 f"cluster's hosts run without jax_enable_x64)")
    return _wire.dtype_from_name(name)


def dtype_proto(dtype: np.dtype) -> types_pb2.DTypeProto:
    """The IFRT dtype of a NumPy dtype."""
    return types_pb2.DTypeProto(kind=_KINDS[_wire.dtype_name(dtype)])
