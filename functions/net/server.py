"""The server's end of the device protocol: a gRPC server with three byte-in, byte-out methods (no generated code).

    /sfl.Device/Join    a device asks to join; the training thread answers with the run's settings and the
                        client's current state, and opens a new session (an older one of that client ends)
    /sfl.Device/Next    the device waits (at most POLL_S) for its next task; "idle" when there is none yet
    /sfl.Device/Reply   the device answers the task it was given (same session, sequence number and kind)

The training thread posts one task at a time per client and waits for its answer (at most --client_timeout). Every
message is authenticated before its tensors are read: the client id is the one of the TLS client certificate's
common name (mutual TLS), and a header naming another client is refused. A reply is checked against what the
task expects (tensor names, dtypes, shapes, size, finite values); anything else is refused with one log line, and
the client is disconnected: it is left out of the step, rejoins, and then gets the server's current state.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from functions.net.credentials import ServerCredentials, client_of_common_name
from functions.net.wire import (
    Message,
    TensorSpec,
    WireError,
    decode,
    encode,
    expect_tensors,
)

logger = logging.getLogger("sfl")

SERVICE = "sfl.Device"
POLL_S = 2.0            # a Next call returns "idle" after this long without a task
JOIN_WAIT_S = 20.0      # a Join call waits this long for the training thread to answer it
CONTROL_VALUES = 16384  # values a control message (join, next) may carry: none are tensors but leave room
HEADER_SLACK_BYTES = 1 << 20


@dataclass
class Task:
    """One posted task and what its answer must be."""

    seq: int
    payload: bytes
    reply_kind: str
    expected: Mapping[str, TensorSpec] | Callable[[Message], Mapping[str, TensorSpec]]
    posted: float
    delivered: bool = False
    reply: Message | None = None
    reply_bytes: int = 0
    answered: float = 0.0
    failure: str | None = None


@dataclass
class Slot:
    """One remote client's session and its task in flight."""

    client_id: int
    session: int = 0
    connected: bool = False
    ready: bool = False  # it asked for a task in this session: built and waiting (a first join builds the model)
    task: Task | None = None
    next_seq: int = 1
    join_request: threading.Event | None = None
    join_answer: bytes | None = None
    history: list[str] = field(default_factory=list)


class DeviceServer:
    """The gRPC server and every remote client's slot; the training thread calls post/wait/serve_joins."""

    def __init__(self, listen: str, client_ids: Sequence[int], max_message_bytes: int,
                 credentials: ServerCredentials | None) -> None:
        self.slots = {client: Slot(client) for client in client_ids}
        self.max_message_bytes = max_message_bytes
        self.secure = credentials is not None
        self._lock = threading.Condition()
        self._sessions = 0
        handlers = {name: grpc.unary_unary_rpc_method_handler(handler)
                    for name, handler in (("Join", self._join), ("Next", self._next), ("Reply", self._reply))}
        # gRPC refuses larger messages before any handler runs; the handlers refuse (and log) above max_message_bytes.
        hard_limit = 2 * max_message_bytes + HEADER_SLACK_BYTES
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * len(client_ids) + 4),
                                   handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
                                   options=[("grpc.max_receive_message_length", hard_limit),
                                            ("grpc.max_send_message_length", hard_limit)],
                                   maximum_concurrent_rpcs=4 * len(client_ids) + 8)
        if credentials is None:
            self.port = self._server.add_insecure_port(listen)
        else:
            server_credentials = grpc.ssl_server_credentials([(credentials.key, credentials.certificate)],
                                                             root_certificates=credentials.ca,
                                                             require_client_auth=True)
            self.port = self._server.add_secure_port(listen, server_credentials)
        self._server.start()

    def stop(self) -> None:
        """Stop serving (calls in flight end at once: a waiting Join too, rather than at the grace period's end)."""
        with self._lock:
            for slot in self.slots.values():
                slot.connected = False
                if slot.join_request is not None:
                    slot.join_request.set()
            self._lock.notify_all()
        self._server.stop(grace=0.5).wait()

    # ---------------------------------------------------------------------------- training thread's side
    def connected(self, client: int) -> bool:
        """Whether `client` is in a session and ready for tasks (joined, then asked for its first task)."""
        with self._lock:
            slot = self.slots[client]
            return slot.connected and slot.ready

    def joins_waiting(self) -> list[int]:
        """Clients whose Join waits for an answer."""
        with self._lock:
            return [c for c, slot in self.slots.items() if slot.join_request is not None and slot.join_answer is None]

    def answer_join(self, client: int, answer: Callable[[int], bytes]) -> None:
        """Open a new session for `client` and answer its Join with answer(session)."""
        with self._lock:
            slot = self.slots[client]
            if slot.join_request is None:
                return
            self._sessions += 1
            slot.session, slot.connected, slot.ready = self._sessions, True, False
            if slot.task is not None and slot.task.reply is None:
                slot.task.failure = "it joined again"
            slot.task = None
            slot.join_answer = answer(slot.session)
            slot.join_request.set()
            self._lock.notify_all()

    def wait_for_joins(self, clients: Sequence[int], deadline: float, answer: Callable[[int, int], bytes]) -> None:
        """Answer Joins until every client in `clients` is connected or the deadline passes."""
        while True:
            for client in self.joins_waiting():
                self.answer_join(client, lambda session, c=client: answer(c, session))
            with self._lock:
                if all(self.slots[c].connected and self.slots[c].ready for c in clients) \
                        or time.monotonic() >= deadline:
                    return
                self._lock.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    def post(self, client: int, kind: str, meta: dict, tensors: dict, reply_kind: str,
             expected: Mapping[str, TensorSpec] | Callable[[Message], Mapping[str, TensorSpec]]) -> int:
        """Give `client` a task; returns the bytes sent (0 when it is not connected)."""
        with self._lock:
            slot = self.slots[client]
            if not slot.connected:
                return 0
            seq = slot.next_seq
            slot.next_seq += 1
            payload = encode(Message(kind, client, slot.session, seq, meta, tensors))
            slot.task = Task(seq, payload, reply_kind, expected, time.monotonic())
            self._lock.notify_all()
            return len(payload)

    def wait(self, client: int, deadline: float, what: str) -> tuple[Message | None, int, float]:
        """The answer to `client`'s task (None after a failure or the deadline, logged once and disconnected), its
        size in bytes and the seconds from posting to answer."""
        with self._lock:
            slot = self.slots[client]
            task = slot.task
            if task is None or not slot.connected:
                return None, 0, 0.0
            while task.reply is None and task.failure is None and slot.connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    task.failure = "no answer within --client_timeout"
                    break
                self._lock.wait(timeout=remaining)
            if task.reply is None:
                reason = task.failure or "it disconnected"
                self._disconnect(slot, f"client {client} left out of {what}: {reason}")
                return None, 0, 0.0
            slot.task = None
            return task.reply, task.reply_bytes, task.answered - task.posted

    def _disconnect(self, slot: Slot, line: str) -> None:
        """Log one line and end the client's session (it must join again); caller holds the lock."""
        if slot.connected:
            logger.warning(line)
        slot.connected = False
        if slot.task is not None and slot.task.reply is None and slot.task.failure is None:
            slot.task.failure = line
        self._lock.notify_all()

    # ---------------------------------------------------------------------------------- gRPC handlers
    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, line: str,
                slot: Slot | None = None) -> None:
        """Log one line, end the sender's session when it is a known client, and abort the call."""
        with self._lock:
            if slot is not None and slot.connected:
                self._disconnect(slot, line)
            else:
                logger.warning(line)
        context.abort(code, line)

    def _authenticated(self, request: bytes, context: grpc.ServicerContext, max_values: int) -> tuple[Slot, Message]:
        """The sender's slot and message: identity first (certificate), then size, format and the header's id."""
        certificate_client = None
        if self.secure:
            names = context.auth_context().get("x509_common_name", [])
            certificate_client = client_of_common_name(names[0].decode(errors="replace")) if len(names) == 1 else None
            if certificate_client is None or certificate_client not in self.slots:
                self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                             f"refused a call from {context.peer()}: its certificate names no remote client")
        known = self.slots.get(certificate_client) if certificate_client is not None else None
        if len(request) > self.max_message_bytes:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"refused a message of {len(request)} bytes from {context.peer()} (the limit is "
                         f"{self.max_message_bytes})", known)
        try:
            message = decode(request, max_values)
        except WireError as error:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"refused a malformed message from {context.peer()}: {error}", known)
        if message.client_id not in self.slots:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"refused a message for unknown client {message.client_id} from {context.peer()}", known)
        if certificate_client is not None and message.client_id != certificate_client:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"refused a message for client {message.client_id} signed by client {certificate_client}'s "
                         "certificate", known)
        return self.slots[message.client_id], message

    def _join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        slot, message = self._authenticated(request, context, CONTROL_VALUES)
        if message.kind != "join":
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"refused a {message.kind} sent to Join")
        event = threading.Event()
        with self._lock:
            if slot.connected:  # e.g. a restarted device: its earlier session ends
                logger.info(f"client {slot.client_id} joined again: its earlier session ends")
                slot.connected = False
                if slot.task is not None and slot.task.reply is None:
                    slot.task.failure = "it joined again"
            slot.join_request, slot.join_answer = event, None
            self._lock.notify_all()
        answered = event.wait(JOIN_WAIT_S)
        with self._lock:
            answer, slot.join_request, slot.join_answer = slot.join_answer, None, None
        if not answered or answer is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is busy (evaluating or saving); join again")
        logger.info(f"client {slot.client_id} joined from {context.peer()}")
        return answer

    def _current_session(self, slot: Slot, message: Message, context: grpc.ServicerContext) -> None:
        """Refuse a message of an ended session (the device then joins again)."""
        with self._lock:
            current = slot.connected and message.session == slot.session
        if not current:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no open session: join again")

    def _next(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        slot, message = self._authenticated(request, context, CONTROL_VALUES)
        self._current_session(slot, message, context)
        deadline = time.monotonic() + POLL_S
        with self._lock:
            if slot.connected and slot.session == message.session and not slot.ready:
                slot.ready = True  # the training thread may now post to it; it asks again at once
                self._lock.notify_all()
                return encode(Message("idle", slot.client_id, slot.session))
            while slot.connected and slot.session == message.session and context.is_active():
                task = slot.task
                if task is not None and not task.delivered and task.reply is None:
                    task.delivered = True
                    return task.payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return encode(Message("idle", slot.client_id, slot.session))
                self._lock.wait(timeout=remaining)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the session ended: join again")

    def _reply(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        slot, message = self._authenticated(request, context, self.max_message_bytes // 4)
        self._current_session(slot, message, context)
        with self._lock:
            task = slot.task
            if task is None or not task.delivered or task.reply is not None or message.seq != task.seq:
                expected = "none" if task is None else task.seq
                line = (f"client {slot.client_id} left out: a repeated or out-of-order message (sequence "
                        f"{message.seq}, expected {expected})")
            elif message.kind != task.reply_kind:
                line = f"client {slot.client_id} left out: sent {message.kind}, expected {task.reply_kind}"
            else:
                try:
                    expected_tensors = task.expected(message) if callable(task.expected) else task.expected
                    expect_tensors(message, expected_tensors)
                    line = ""
                except WireError as error:
                    line = f"client {slot.client_id} left out: {error}"
            if line:
                self._disconnect(slot, line)
            else:
                task.reply, task.reply_bytes, task.answered = message, len(request), time.monotonic()
                self._lock.notify_all()
        if line:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, line)
        return encode(Message("ack", slot.client_id, slot.session, message.seq))
