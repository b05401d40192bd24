"""A minimal ONNX model writer: serialises a small graph (nodes, numpy initializers, typed inputs/outputs) to the
ONNX protobuf wire format, so the runtime can build its cell-scoring graph at load time without the ``onnx``
package (the device install is numpy + OpenCV + onnxruntime).

Only the fields such a graph needs are written; field numbers and type codes are those of ``onnx/onnx.proto``
(ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto, TypeProto, OperatorSetIdProto).
"""
from __future__ import annotations

import struct

import numpy as np

#: TensorProto.DataType codes (onnx.proto)
DTYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
          np.dtype(np.int64): 7, np.dtype(np.float16): 10, np.dtype(np.float64): 11}
#: AttributeProto.AttributeType codes
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are written as their 64-bit two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(int(v))


def _bytes(field: int, v: bytes | str) -> bytes:
    v = v.encode() if isinstance(v, str) else bytes(v)
    return _key(field, 2) + _varint(len(v)) + v


def _float(field: int, v: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", v)


def _tensor_header(name: str, dtype, shape) -> bytes:
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"onnxgraph: no ONNX type for {dtype}")
    return b"".join(_int(1, d) for d in shape) + _int(2, DTYPES[dtype]) + _bytes(8, name)


def tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto with raw little-endian data (for small initializers: the bytes are copied)."""
    a = np.ascontiguousarray(array)
    return _tensor_header(name, a.dtype, a.shape) + _bytes(9, a.astype(a.dtype.newbyteorder("<")).tobytes())


def external_tensor(name: str, dtype, shape) -> bytes:
    """TensorProto declared with external data; onnxruntime fills it from memory
    (``SessionOptions.add_external_initializers``), so a large table is never serialised into the model bytes."""
    location = _bytes(1, "location") + _bytes(2, f"{name}.bin")  # never read: the data comes from memory
    return _tensor_header(name, dtype, shape) + _bytes(13, location) + _int(14, 1)


def value_info(name: str, dtype, shape) -> bytes:
    """ValueInfoProto; ``shape`` entries are ints (fixed) or strings (symbolic)."""
    dims = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in shape)
    tensor_type = _int(1, DTYPES[np.dtype(dtype)]) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def node(op_type: str, inputs: list[str], outputs: list[str], name: str = "", domain: str = "", **attrs) -> bytes:
    """NodeProto; attributes may be int, float or a list of ints."""
    body = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    body += _bytes(3, name or outputs[0]) + _bytes(4, op_type)
    for key, v in attrs.items():
        if isinstance(v, (list, tuple)):
            a = _bytes(1, key) + b"".join(_int(8, x) for x in v) + _int(20, _ATTR_INTS)
        elif isinstance(v, float):
            a = _bytes(1, key) + _float(2, v) + _int(20, _ATTR_FLOAT)
        else:
            a = _bytes(1, key) + _int(3, v) + _int(20, _ATTR_INT)
        body += _bytes(5, a)
    if domain:
        body += _bytes(7, domain)
    return body


def model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes], initializers: list[bytes] = (),
          name: str = "graph", opset: int = 17, ir_version: int = 8, producer: str = "geosurge") -> bytes:
    """Serialised ModelProto (default: IR 8, opset 17, which onnxruntime >= 1.14 reads)."""
    graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name)
             + b"".join(_bytes(5, t) for t in initializers)
             + b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs))
    return (_int(1, ir_version) + _bytes(2, producer) + _bytes(7, graph)
            + _bytes(8, _bytes(1, "") + _int(2, opset)))
