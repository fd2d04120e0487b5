"""Read an ONNX file's graph inputs and outputs (names, shapes) without loading its weights.

An InsightFace pack folder holds several ``.onnx`` files (detector, recogniser, landmark and
gender/age models) whose names vary between packs, so the right files are picked by their
interfaces. Opening each with ONNX Runtime would load hundreds of megabytes just to look, and the
``onnx`` package is not a runtime dependency; this reader walks the protobuf wire format and seeks
over node and weight payloads, so inspecting a 170 MB model touches a few kilobytes.

Only the fields needed are decoded (field numbers from ``onnx.proto``):
ModelProto.graph=7; GraphProto.initializer=5, input=11, output=12; TensorProto.name=8;
ValueInfoProto.name=1, type=2; TypeProto.tensor_type=1; TypeProto.Tensor.shape=2;
TensorShapeProto.dim=1; Dimension.dim_value=1, dim_param=2.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[Dim, ...] | None  # None: the file does not say


@dataclass(frozen=True, slots=True)
class OnnxInterface:
    inputs: tuple[TensorInfo, ...]  # graph inputs that are not weights
    outputs: tuple[TensorInfo, ...]


class OnnxFormatError(ValueError):
    """The file is not a readable ONNX model."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise OnnxFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxFormatError("varint too long")


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value start, value end) for one message; varints as (n, 0, value, 0)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, 0
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise OnnxFormatError("field runs past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        else:  # groups (3/4) are not used by ONNX
            raise OnnxFormatError(f"unsupported wire type {wire}")
    if pos != end:
        raise OnnxFormatError("message length mismatch")


def _string(buf: mmap.mmap | bytes, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", errors="replace")


def _tensor_name(buf: mmap.mmap | bytes, start: int, end: int) -> str:
    for number, wire, s, e in _fields(buf, start, end):
        if number == 8 and wire == 2:
            return _string(buf, s, e)
    return ""


def _dim(buf: mmap.mmap | bytes, start: int, end: int) -> Dim:
    for number, wire, s, e in _fields(buf, start, end):
        if number == 1 and wire == 0:
            return s  # varint value (dim_value)
        if number == 2 and wire == 2:
            return _string(buf, s, e)
    return None


def _value_info(buf: mmap.mmap | bytes, start: int, end: int) -> TensorInfo:
    name = ""
    shape: tuple[Dim, ...] | None = None
    for number, wire, s, e in _fields(buf, start, end):
        if number == 1 and wire == 2:
            name = _string(buf, s, e)
        elif number == 2 and wire == 2:  # TypeProto
            for n2, w2, s2, e2 in _fields(buf, s, e):
                if n2 == 1 and w2 == 2:  # tensor_type
                    for n3, w3, s3, e3 in _fields(buf, s2, e2):
                        if n3 == 2 and w3 == 2:  # shape
                            shape = tuple(
                                _dim(buf, s4, e4) for n4, w4, s4, e4 in _fields(buf, s3, e3) if n4 == 1 and w4 == 2
                            )
    return TensorInfo(name, shape)


def read_interface(path: Path | str) -> OnnxInterface:
    """Inputs and outputs of the model at ``path``; raises ``OnnxFormatError`` or ``OSError``."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise OnnxFormatError(f"{path} is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph: tuple[int, int] | None = None
            for number, wire, s, e in _fields(buf, 0, size):
                if number == 7 and wire == 2:
                    graph = (s, e)
            if graph is None:
                raise OnnxFormatError(f"{path} has no graph")
            weights: set[str] = set()
            inputs: list[TensorInfo] = []
            outputs: list[TensorInfo] = []
            for number, wire, s, e in _fields(buf, *graph):
                if wire != 2:
                    continue
                if number == 5:
                    weights.add(_tensor_name(buf, s, e))
                elif number == 11:
                    inputs.append(_value_info(buf, s, e))
                elif number == 12:
                    outputs.append(_value_info(buf, s, e))
    # Models exported with old IR versions list every weight as a graph input too.
    real_inputs = tuple(i for i in inputs if i.name not in weights)
    if not real_inputs or not outputs:
        raise OnnxFormatError(f"{path} declares no inputs or no outputs")
    return OnnxInterface(real_inputs, tuple(outputs))


# ---- what a file looks like ----------------------------------------------------------------------

# SCRFD exports: 6/9 outputs for 3 strides (without/with landmarks), 10/15 for 5 strides.
_SCRFD_OUTPUT_COUNTS = {6: False, 9: True, 10: False, 15: True}


def looks_like_scrfd(info: OnnxInterface) -> bool:
    """One 3-channel image input, and score/box(/landmark) heads per stride."""
    if len(info.inputs) != 1 or len(info.outputs) not in _SCRFD_OUTPUT_COUNTS:
        return False
    shape = info.inputs[0].shape
    if shape is None or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        return False
    last_dims = [o.shape[-1] for o in info.outputs if o.shape]
    if len(last_dims) == len(info.outputs) and all(isinstance(d, int) for d in last_dims):
        per_kind = len(info.outputs) // (3 if _SCRFD_OUTPUT_COUNTS[len(info.outputs)] else 2)
        expected = {1: per_kind, 4: per_kind}
        if _SCRFD_OUTPUT_COUNTS[len(info.outputs)]:
            expected[10] = per_kind
        return {d: last_dims.count(d) for d in set(last_dims)} == expected
    return True  # dynamic head shapes: the output count is the best evidence there is


def looks_like_arcface(info: OnnxInterface, embedding_size: int = 512) -> bool:
    """One N x 3 x 112 x 112 input and one N x ``embedding_size`` output."""
    if len(info.inputs) != 1 or len(info.outputs) != 1:
        return False
    shape = info.inputs[0].shape
    out = info.outputs[0].shape
    return (
        shape is not None
        and len(shape) == 4
        and tuple(shape[1:]) == (3, 112, 112)
        and out is not None
        and len(out) >= 2
        and out[-1] == embedding_size
    )
