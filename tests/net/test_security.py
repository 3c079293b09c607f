"""The device server refuses what it must (each with one log line) and keeps serving the honest client: no or
foreign credentials, plain text against TLS, another client's id, malformed, oversized, pickled, repeated messages."""
from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from functions.device.client import DeviceLoop, Link
from functions.net.credentials import ClientCredentials, ServerCredentials
from functions.net.server import SERVICE, DeviceServer
from functions.net.wire import Message, TensorSpec, decode, encode

LIMIT = 8192
SMASHED = {"smashed.0": TensorSpec(torch.float32, (2, 4))}


class Lines(logging.Handler):
    """The run's log lines (the "sfl" logger does not propagate once a run set it up)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


@pytest.fixture(scope="module")
def server(certs: Path) -> Iterator[DeviceServer]:
    served = DeviceServer("127.0.0.1:0", [2, 3], LIMIT, ServerCredentials.read(certs))
    yield served
    served.stop()


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("sfl")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def link(server: DeviceServer, certs: Path, client: int) -> Link:
    return Link(f"127.0.0.1:{server.port}", client, ClientCredentials.read(certs, client), 10.0)


def join(server: DeviceServer, device: Link) -> int:
    """Join as the device while the training thread answers; returns the session."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(device.call, "Join", encode(Message("join", device.client_id)))
        deadline = time.monotonic() + 10
        while device.client_id not in server.joins_waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.answer_join(device.client_id, lambda session: encode(Message("welcome", device.client_id, session)))
        session = decode(answer.result(timeout=10), 100).session
    ready = device.call("Next", encode(Message("next", device.client_id, session)))  # idle: no task yet
    assert decode(ready, 100).kind == "idle"
    return session


def task(server: DeviceServer, device: Link, session: int) -> Message:
    """Post a forward task to the device's client and fetch it as the device does."""
    server.post(device.client_id, "forward", {}, {}, "smashed", SMASHED)
    return decode(device.call("Next", encode(Message("next", device.client_id, session))), 100)


def honest_round(server: DeviceServer, certs: Path) -> None:
    """Client 2 joins, gets a task and answers it: the server is still working for the honest client."""
    device = link(server, certs, 2)
    session = join(server, device)
    given = task(server, device, session)
    device.call("Reply", encode(Message("smashed", 2, session, given.seq, {}, {"smashed.0": torch.ones(2, 4)})))
    reply, size, _ = server.wait(2, time.monotonic() + 10, "the test step")
    assert reply is not None and size > 0 and torch.equal(reply.tensors["smashed.0"], torch.ones(2, 4))
    device.close()


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, error.value.details()
    return error.value.details()


def test_without_a_client_certificate_or_in_plain_text_nothing_gets_through(server, certs, lines, capfd) -> None:
    address = f"127.0.0.1:{server.port}"
    plain = grpc.insecure_channel(address)
    refused(lambda: plain.unary_unary(f"/{SERVICE}/Join")(encode(Message("join", 2)), timeout=5),
            grpc.StatusCode.UNAVAILABLE)
    ca_only = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())
    no_certificate = grpc.secure_channel(address, ca_only)
    refused(lambda: no_certificate.unary_unary(f"/{SERVICE}/Join")(encode(Message("join", 2)), timeout=5),
            grpc.StatusCode.UNAVAILABLE)
    plain.close()
    no_certificate.close()
    assert lines.take() == []  # the TLS handshake refuses them: no handler ran
    honest_round(server, certs)
    # What the server's operator sees instead (docs/devices.md): gRPC's own line on stderr per refused handshake.
    refusals = [line for line in capfd.readouterr().err.splitlines() if "Handshake failed" in line]
    assert any("WRONG_VERSION_NUMBER" in line for line in refusals), refusals
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in line for line in refusals), refusals


def test_another_clients_id_or_no_remote_clients_certificate_is_refused(server, certs, lines) -> None:
    impostor = link(server, certs, 3)
    details = refused(lambda: impostor.call("Join", encode(Message("join", 2))), grpc.StatusCode.PERMISSION_DENIED)
    assert "signed by client 3's certificate" in details
    outsider = link(server, certs, 0)  # a valid certificate of a client that is not remote in this run
    refused(lambda: outsider.call("Join", encode(Message("join", 0))), grpc.StatusCode.PERMISSION_DENIED)
    assert len(lines.take()) == 2
    honest_round(server, certs)


@pytest.mark.parametrize("tensors, reason", [
    ({"smashed.0": torch.ones(3, 4)}, "expected float32 [2, 4]"),
    ({"smashed.0": torch.ones(2, 4, dtype=torch.float64)}, "expected float32"),
    ({"smashed.1": torch.ones(2, 4)}, "missing"),
])
def test_a_malformed_tensor_leaves_the_client_out(server, certs, lines, tensors, reason) -> None:
    device = link(server, certs, 2)
    session = join(server, device)
    given = task(server, device, session)
    refused(lambda: device.call("Reply", encode(Message("smashed", 2, session, given.seq, {}, tensors))),
            grpc.StatusCode.FAILED_PRECONDITION)
    assert server.wait(2, time.monotonic() + 5, "the test step")[0] is None
    assert not server.connected(2)
    logged = lines.take()
    assert len(logged) == 1 and reason in logged[0], logged
    honest_round(server, certs)  # it rejoins and works again


def test_nan_oversized_pickled_and_repeated_messages_are_refused(server, certs, lines) -> None:
    device = link(server, certs, 2)
    cases = [
        (lambda s, seq: encode(Message("smashed", 2, s, seq, {}, {"smashed.0": torch.full((2, 4), float("nan"))})),
         grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (lambda s, seq: encode(Message("smashed", 2, s, seq, {}, {"big": torch.zeros(2 * LIMIT // 4)})),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is"),
        (lambda s, seq: pickle.dumps({"kind": "smashed", "client_id": 2, "seq": seq}),
         grpc.StatusCode.INVALID_ARGUMENT, "bad magic"),
    ]
    for payload, code, reason in cases:
        session = join(server, device)
        given = task(server, device, session)
        message = payload(session, given.seq)
        refused(lambda message=message: device.call("Reply", message), code)
        logged = lines.take()
        assert len(logged) == 1 and reason in logged[0], logged
        assert server.wait(2, time.monotonic() + 5, "the test step")[0] is None
    session = join(server, device)
    given = task(server, device, session)
    good = encode(Message("smashed", 2, session, given.seq, {}, {"smashed.0": torch.ones(2, 4)}))
    device.call("Reply", good)
    refused(lambda: device.call("Reply", good), grpc.StatusCode.FAILED_PRECONDITION)  # a replay
    assert "repeated or out-of-order" in lines.take()[0]
    huge = encode(Message("smashed", 2, session, 99, {}, {"big": torch.zeros(3 * LIMIT)}))
    refused(lambda: device.call("Reply", huge), grpc.StatusCode.RESOURCE_EXHAUSTED)  # gRPC's own limit
    honest_round(server, certs)


def test_a_device_gives_up_when_no_server_answers(certs) -> None:
    started = time.monotonic()
    device = Link("127.0.0.1:9", 2, ClientCredentials.read(certs, 2), 1.0)
    assert DeviceLoop(device, ".", retry_s=0.5).run() == 1
    assert time.monotonic() - started < 10
