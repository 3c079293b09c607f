"""The wire format: what it carries back unchanged, and every malformed message it refuses."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from functions.net.wire import (
    MAGIC,
    Message,
    TensorSpec,
    WireError,
    decode,
    encode,
    expect_tensors,
)


def sample() -> Message:
    return Message("smashed", 3, 7, 11, {"compute_s": 0.5, "keys": [2**63 + 5]},
                   {"smashed.0": torch.arange(24, dtype=torch.float32).view(2, 3, 4),
                    "counter": torch.tensor(9, dtype=torch.int64)})


def test_a_message_comes_back_unchanged() -> None:
    message = decode(encode(sample()), max_values=100)
    assert (message.kind, message.client_id, message.session, message.seq) == ("smashed", 3, 7, 11)
    assert message.meta == {"compute_s": 0.5, "keys": [2**63 + 5]}  # uint64 sample keys survive JSON
    assert torch.equal(message.tensors["smashed.0"], sample().tensors["smashed.0"])
    assert message.tensors["counter"].dtype == torch.int64


def with_header(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + payload


def spec(name: str = "x", dtype: str = "float32", shape: list | None = None) -> dict:
    return {"name": name, "dtype": dtype, "shape": [2] if shape is None else shape}


BASE = {"kind": "smashed", "client_id": 1, "session": 1, "seq": 1, "meta": {}}


@pytest.mark.parametrize("data, reason", [
    (pickle.dumps({"kind": "smashed"}), "bad magic"),
    (MAGIC + struct.pack("<I", 10**9), "header length"),
    (with_header({**BASE, "tensors": [spec(dtype="object")]}, b""), "not allowed"),
    (with_header({**BASE, "tensors": [spec(shape=[-1])]}, b""), "integer >= 0"),
    (with_header({**BASE, "tensors": [spec(shape=[4])]}, b"\0" * 8), "bytes left"),
    (with_header({**BASE, "tensors": [spec()]}, b"\0" * 12), "bytes after"),
    (with_header({**BASE, "tensors": [spec()]}, struct.pack("<2f", 1.0, float("nan"))), "NaN"),
    (with_header({**BASE, "tensors": [spec()]}, struct.pack("<2f", 1.0, float("inf"))), "NaN or infinite"),
    (with_header({**BASE, "tensors": [spec(shape=[1000])]}, b"\0" * 4000), "more than"),
    (with_header({**BASE, "client_id": True, "tensors": []}, b""), "client_id"),
    (with_header({**BASE, "kind": "__import__('os')", "tensors": []}, b""), "not a name"),
])
def test_malformed_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode(data, max_values=100)


def test_the_receiver_refuses_other_shapes_dtypes_and_names() -> None:
    message = decode(encode(sample()), max_values=100)
    good = {"smashed.0": TensorSpec(torch.float32, (2, 3, 4)), "counter": TensorSpec(torch.int64, ())}
    expect_tensors(message, good)
    with pytest.raises(WireError, match="expected float32 \\[2, 3, 5\\]"):
        expect_tensors(message, {**good, "smashed.0": TensorSpec(torch.float32, (2, 3, 5))})
    with pytest.raises(WireError, match="missing"):
        expect_tensors(message, {**good, "smashed.1": TensorSpec(torch.float32, (1,))})
