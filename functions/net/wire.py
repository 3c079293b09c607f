"""The bytes of one message between the server and a device: a small JSON header, then raw little-endian tensors.

    b"SFLW" | header length (uint32, little-endian) | header (UTF-8 JSON object) | tensor bytes, in header order

The header names the message (`kind`), the client, its session and sequence number, free `meta` values (numbers,
strings, lists of them) and every tensor's name, dtype and shape. Decoding is strict: the magic, a bounded header,
a dtype from a short allow-list, shapes of non-negative integers, a byte count equal to what the shapes need, and
finite floating values. Nothing here can run code from the wire (no pickle, no torch.load).
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MAGIC = b"SFLW"
MAX_HEADER_BYTES = 1 << 20  # a step's header holds at most a few thousand sample indices and keys
_LENGTH = struct.Struct("<I")
# Tensors a message may carry: float weights and activations, int64 counters (e.g. BatchNorm's).
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float64": (torch.float64, "<f8"),
    "int64": (torch.int64, "<i8"),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


class WireError(ValueError):
    """A message that breaks the format or the receiver's expectations (the text says how)."""


@dataclass
class Message:
    """One decoded (or to-be-encoded) message."""

    kind: str
    client_id: int
    session: int = 0
    seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(message: Message) -> bytes:
    """The message's bytes (tensors moved to the CPU, made contiguous, little-endian)."""
    specs, chunks = [], []
    for name, tensor in message.tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype not in _NAMES:
            raise WireError(f"tensor {name}: dtype {tensor.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
        specs.append({"name": name, "dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape)})
        chunks.append(tensor.numpy().astype(DTYPES[_NAMES[tensor.dtype]][1], copy=False).tobytes())
    header = json.dumps({"kind": message.kind, "client_id": message.client_id, "session": message.session,
                         "seq": message.seq, "meta": message.meta, "tensors": specs},
                        separators=(",", ":"), allow_nan=False).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *chunks])


def _integer(value: Any, what: str, minimum: int = 0) -> int:
    """A JSON integer (not a bool) of at least `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise WireError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header and the offset of the first tensor byte."""
    if len(data) < len(MAGIC) + _LENGTH.size or data[:len(MAGIC)] != MAGIC:
        raise WireError("not a message of this protocol (bad magic)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if length > MAX_HEADER_BYTES or start + length > len(data):
        raise WireError(f"header length {length} is out of bounds")
    try:
        header = json.loads(data[start:start + length].decode("utf-8"),
                            parse_constant=lambda name: (_ for _ in ()).throw(WireError(f"{name} in the header")))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError(f"the header is not UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise WireError("the header is not a JSON object")
    return header, start + length


def decode(data: bytes, max_values: int) -> Message:
    """A message from bytes, checked: format, dtypes, shapes (at most `max_values` values in all), byte count,
    finite floats. Raises WireError."""
    header, offset = _header(data)
    kind = header.get("kind")
    if not isinstance(kind, str) or not kind.isidentifier():
        raise WireError(f"kind {kind!r} is not a name")
    meta = header.get("meta", {})
    specs = header.get("tensors", [])
    if not isinstance(meta, dict) or not isinstance(specs, list):
        raise WireError("meta must be an object and tensors a list")
    tensors: dict[str, torch.Tensor] = {}
    total_values = 0
    for spec in specs:
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise WireError("a tensor entry must have exactly name, dtype and shape")
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or name in tensors:
            raise WireError(f"tensor name {name!r} is not a new string")
        if dtype not in DTYPES:
            raise WireError(f"tensor {name}: dtype {dtype!r} is not allowed ({', '.join(DTYPES)})")
        if not isinstance(shape, list) or len(shape) > 8:
            raise WireError(f"tensor {name}: shape {shape!r} is not a list of at most 8 sizes")
        sizes = [_integer(size, f"tensor {name}'s size") for size in shape]
        count = math.prod(sizes)
        total_values += count
        if total_values > max_values:
            raise WireError(f"the tensors hold more than the {max_values} values expected")
        torch_dtype, numpy_dtype = DTYPES[dtype]
        nbytes = count * np.dtype(numpy_dtype).itemsize
        if offset + nbytes > len(data):
            raise WireError(f"tensor {name}: {len(data) - offset} bytes left, {nbytes} needed")
        array = np.frombuffer(data, dtype=numpy_dtype, count=count, offset=offset).reshape(sizes)
        tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireError(f"tensor {name} holds NaN or infinite values")
        tensors[name] = tensor.to(torch_dtype)
        offset += nbytes
    if offset != len(data):
        raise WireError(f"{len(data) - offset} bytes after the last tensor")
    return Message(kind, _integer(header.get("client_id"), "client_id"), _integer(header.get("session", 0), "session"),
                   _integer(header.get("seq", 0), "seq"), meta, tensors)


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def expect_tensors(message: Message, expected: Mapping[str, TensorSpec]) -> None:
    """Refuse a message whose tensors are not exactly the expected names, dtypes and shapes."""
    if set(message.tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(message.tensors)), sorted(set(message.tensors) - set(expected))
        raise WireError(f"tensors do not match: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in expected.items():
        tensor = message.tensors[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise WireError(f"tensor {name} is {_NAMES.get(tensor.dtype, tensor.dtype)} {list(tensor.shape)}, "
                            f"expected {_NAMES.get(spec.dtype, spec.dtype)} {list(spec.shape)}")


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The specs tensors like these have."""
    return {name: TensorSpec(tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
