"""A connection over a plain blocking socket, for the sync :class:`hypercache.Client`.

Same wire protocol, handshake and error mapping as :mod:`hypercache.net.tcp`, no
event loop. :meth:`BlockingConnection.pipeline` sends a batch of requests in one
``sendall`` and collects the answers by request id.

**Not thread-safe**: one thread at a time may use a connection (hold one per
thread, or a lock around it).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from hypercache.errors import (
    HyperCacheError,
    NodeUnavailableError,
    ProtocolError,
    RequestTimeoutError,
    error_from_wire,
)
from hypercache.net.protocol import (
    FrameDecoder,
    FrameEncoder,
    Limits,
    MsgType,
    Op,
    frame_header,
    prepare_hello,
    validate_hello_answer,
)
from hypercache.net.transport import DEFAULT_CONNECT_TIMEOUT, NetStats, parse_address

__all__ = ["BlockingConnection"]

_REQUEST: Final = int(MsgType.REQUEST)
_RESPONSE: Final = int(MsgType.RESPONSE)
_MAX_REQUEST_ID: Final = 0xFFFFFFFF
_RECV_SIZE: Final = 256 * 1024
_MISSING: Final = object()


class BlockingConnection:
    """A blocking connection to a node: connect, handshake, then requests.

    :param address: ``"host:port"`` of the node.
    :param hello: HELLO payload (see :func:`~hypercache.net.protocol.make_hello`);
        ``version`` is filled in when missing.
    :param limits: size limits; requests over ``max_frame`` are refused locally.
    :param timeout: deadline of connecting plus handshaking, and the default
        deadline of requests, in seconds.

    :raises NodeUnavailableError: cannot connect, or no handshake within ``timeout``.
    :raises HandshakeError: the server refused the HELLO.

    Not thread-safe. Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.limits = limits if limits is not None else Limits()
        #: the server's HELLO answer (``version``, ``cluster``, ``node_id``, ``info``)
        self.peer_hello: dict[str, Any] = {}
        self.stats = NetStats()
        self._decoder = FrameDecoder(self.limits.max_frame)
        self._encoder = FrameEncoder(self.limits.max_frame)
        self._rbuf = bytearray(_RECV_SIZE)
        self._next_id = 1
        self._lost_reason = "connection closed"
        host, port = parse_address(address)
        payload = prepare_hello(hello)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:  # TimeoutError included
            raise NodeUnavailableError(f"{address}: cannot connect: {exc}") from None
        self._sock: socket.socket | None = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answer = self.request(Op.HELLO, payload, timeout)
            self.peer_hello = validate_hello_answer(answer, cluster=payload["cluster"])
        except RequestTimeoutError:
            self.close()
            raise NodeUnavailableError(f"{address}: no HELLO answer within {timeout}s") from None
        except BaseException:
            self.close()
            raise

    # -- API

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Close the socket (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, op: int, payload: Any, timeout: float | None = None) -> Any:
        """Send one request and return the answer's payload.

        :raises HyperCacheError: the error the server answered with.
        :raises RequestTimeoutError: no answer in time; the connection stays
            usable and the late answer is skipped when it arrives.
        :raises NodeUnavailableError: the connection is closed or was lost.
        :raises ProtocolError: ``payload`` cannot be encoded (nothing is sent).
        :raises FrameTooLargeError: the request is over ``max_frame`` (nothing is sent).
        """
        result = self._exchange(((op, payload),), timeout)[0]
        if isinstance(result, HyperCacheError):
            raise result
        return result

    def pipeline(
        self, requests: Iterable[tuple[int, Any]], timeout: float | None = None
    ) -> list[Any]:
        """Send all ``(op, payload)`` requests at once; return their answers in order.

        Each item of the result is the answer's payload, or the exception for that
        request: the server's error, :class:`RequestTimeoutError` when the answer
        did not come within ``timeout`` (the whole batch's deadline), or
        :class:`NodeUnavailableError` when the connection broke meanwhile (it is
        then closed; the requests may or may not have been carried out).

        :raises NodeUnavailableError: the connection was already closed.
        :raises ProtocolError, FrameTooLargeError: a request cannot be encoded;
            nothing is sent.
        """
        return self._exchange(requests, timeout)

    # -- internals

    def _exchange(self, requests: Iterable[tuple[int, Any]], timeout: float | None) -> list[Any]:
        sock = self._sock
        if sock is None:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
        if timeout is None:
            timeout = self.timeout
        encoder = self._encoder
        out = bytearray()
        slots: dict[int, int] = {}
        ops: list[int] = []
        request_id = self._next_id
        for op, payload in requests:
            body = encoder.encode_body(_REQUEST, request_id, op, payload)
            out += frame_header(len(body))
            out += body
            slots[request_id] = len(ops)
            ops.append(op)
            request_id = request_id + 1 if request_id < _MAX_REQUEST_ID else 1
        self._next_id = request_id
        results: list[Any] = [_MISSING] * len(ops)
        if not ops:
            return results
        stats = self.stats
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            sock.sendall(out)
        except OSError as exc:
            # Part of the batch may be on the wire: the stream is unusable.
            self._lost(f"send failed: {exc}")
            return self._fill(results, ops, self._unavailable)
        stats.frames_out += len(ops)
        stats.bytes_out += len(out)
        stats.writes += 1
        missing = len(ops)
        decoder = self._decoder
        view = memoryview(self._rbuf)
        try:
            while True:
                for msg_type, rid, _, payload in decoder:
                    stats.frames_in += 1
                    if msg_type == _REQUEST:
                        raise ProtocolError("the server sent a REQUEST frame")
                    slot = slots.pop(rid, None)
                    if slot is None:
                        stats.late_responses += 1  # answer to a request that timed out
                        continue
                    results[slot] = payload if msg_type == _RESPONSE else error_from_wire(payload)
                    missing -= 1
                if not missing:
                    return results
                left = deadline - time.monotonic()
                if left <= 0:
                    stats.timeouts += missing
                    return self._fill(results, ops, self._timed_out(timeout))
                sock.settimeout(left)
                try:
                    n = sock.recv_into(view)
                except TimeoutError:
                    continue  # the deadline check above turns it into timeouts
                except OSError as exc:
                    self._lost(f"connection lost: {exc}")
                    return self._fill(results, ops, self._unavailable)
                if not n:
                    self._lost("connection closed by the server")
                    return self._fill(results, ops, self._unavailable)
                stats.bytes_in += n
                decoder.feed(view[:n])
        except ProtocolError as exc:
            stats.protocol_errors += 1
            self._lost(f"protocol error: {exc}")
            return self._fill(results, ops, self._unavailable)
        finally:
            view.release()

    def _lost(self, reason: str) -> None:
        self._lost_reason = reason
        self.close()
        self._decoder = FrameDecoder(self.limits.max_frame)

    def _unavailable(self, op: int) -> HyperCacheError:
        return NodeUnavailableError(f"{self.address}: {self._lost_reason}")

    def _timed_out(self, timeout: float) -> Callable[[int], HyperCacheError]:
        def make(op: int) -> HyperCacheError:
            return RequestTimeoutError(f"{self.address}: op {op} got no answer within {timeout}s")

        return make

    @staticmethod
    def _fill(
        results: list[Any], ops: list[int], make: Callable[[int], HyperCacheError]
    ) -> list[Any]:
        for i, value in enumerate(results):
            if value is _MISSING:
                results[i] = make(ops[i])
        return results
