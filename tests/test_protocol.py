"""Unit tests of the wire protocol: framing, limits, handshake validation (no I/O)."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypercache._core import framing
from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import (
    ConfigError,
    FrameTooLargeError,
    HandshakeError,
    HyperCacheError,
    KeyTooLargeError,
    NodeUnavailableError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    ServerError,
    ValueTooLargeError,
    error_from_wire,
)
from hypercache.net.protocol import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_KEY,
    DEFAULT_MAX_VALUE,
    FEATURE_COMPRESSION,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameEncoder,
    Limits,
    MsgType,
    Op,
    clock_offset_ms,
    encode_error,
    encode_request,
    encode_response,
    make_hello,
    prepare_hello,
    request_deadline,
    validate_hello,
    validate_hello_answer,
)
from hypercache.net.transport import ServerOptions
from hypercache.units import format_hostport, parse_hostport

# Everything msgpack carries losslessly with our options (lists, str-keyed maps,
# bin as bytes, finite floats).
payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=200),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)
request_ids = st.integers(min_value=0, max_value=2**32 - 1)
ops = st.sampled_from(list(Op)) | st.integers(min_value=0, max_value=255)
errors = st.sampled_from(
    [
        ProtocolError("bad"),
        FrameTooLargeError("big"),
        HandshakeError("no"),
        NodeUnavailableError("gone"),
        RequestTimeoutError("slow"),
        QuorumError(1, 2),
        ConfigError("field", "wrong"),
        KeyTooLargeError("key"),
        ValueTooLargeError("value"),
        ServerError("oops"),
        KeyError("not ours"),
    ]
)


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> list[Frame]:
    decoder = FrameDecoder(max_frame)
    decoder.feed(data)
    frames = list(decoder)
    assert decoder.buffered == 0
    return frames


def raw_frame(body: Any) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


# ------------------------------------------------------------------------ enums


def test_message_types_and_ops_are_stable() -> None:
    assert [int(t) for t in MsgType] == [0, 1, 2]
    assert {op.name: int(op) for op in Op} == {
        "HELLO": 0,
        "PING": 1,
        "GET": 2,
        "SET": 3,
        "DELETE": 4,
        "TOPOLOGY": 5,
        "TTL": 6,
        "EXPIRE": 7,
        "SCAN": 8,
        "FLUSH": 9,
        "R_GET": 10,
        "R_PUT": 11,
        "R_PUT_MANY": 12,
        "R_DEL": 13,
        "W_PUT": 14,
        "W_HINT": 15,
        "MERKLE": 20,
        "KEYS": 21,
        "PULL": 22,
        "STREAM": 23,
        "HOLDS": 24,
        "PING_REQ": 30,
        "MEMBERS": 31,
        "LEAVE": 32,
        "REMOVE": 33,
        "WATCH": 50,
        "ADD": 51,
    }


# ------------------------------------------------------------------------ round trips


@given(request_id=request_ids, op=ops, payload=payloads)
def test_request_round_trip(request_id: int, op: int, payload: Any) -> None:
    (frame,) = decode_all(encode_request(request_id, op, payload))
    assert frame == Frame(MsgType.REQUEST, request_id, op, payload)
    assert isinstance(frame, Frame)


@given(request_id=request_ids, op=ops, payload=payloads)
def test_response_round_trip(request_id: int, op: int, payload: Any) -> None:
    (frame,) = decode_all(encode_response(request_id, op, payload))
    assert frame == (MsgType.RESPONSE, request_id, op, payload, 0, None)


@given(request_id=request_ids, op=ops, exc=errors)
def test_error_round_trip_keeps_the_error_type(
    request_id: int, op: int, exc: BaseException
) -> None:
    (frame,) = decode_all(encode_error(request_id, op, exc))
    assert frame.type == MsgType.ERROR
    assert (frame.request_id, frame.op) == (request_id, op)
    rebuilt = error_from_wire(frame.payload)
    if isinstance(exc, HyperCacheError):
        assert type(rebuilt) is type(exc)
        assert str(rebuilt) == str(exc)
    else:
        assert type(rebuilt) is ServerError
        assert "KeyError" in str(rebuilt)
    if isinstance(exc, QuorumError):
        assert isinstance(rebuilt, QuorumError)
        assert (rebuilt.acks, rebuilt.required) == (exc.acks, exc.required)


def test_values_travel_as_bin_and_strings_as_str() -> None:
    (frame,) = decode_all(encode_request(1, Op.SET, {"key": b"k", "value": b"\xff\x00", "s": "é"}))
    assert frame.payload == {"key": b"k", "value": b"\xff\x00", "s": "é"}
    body = FrameEncoder().encode_body(0, 1, 3, b"\xff")
    assert b"\xc4\x01\xff" in body  # msgpack bin 8, not str


@given(
    frames=st.lists(
        st.tuples(st.sampled_from(list(MsgType)), request_ids, ops, payloads),
        min_size=1,
        max_size=8,
    ),
    data=st.data(),
)
@settings(max_examples=60)
def test_decoder_random_chunkings(frames: list[tuple[int, int, int, Any]], data: Any) -> None:
    encoder = FrameEncoder()
    stream = b"".join(
        encoder.encode_request(r, o, p)
        if t == MsgType.REQUEST
        else encoder.encode_response(r, o, p)
        if t == MsgType.RESPONSE
        else encoder.encode_error(r, o, ServerError(str(p)))
        for t, r, o, p in frames
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[start:cut])
        out.extend(decoder)
        start = cut
    assert [(f.type, f.request_id, f.op) for f in out] == [(t, r, o) for t, r, o, _ in frames]
    assert decoder.buffered == 0


@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    data=st.data(),
)
@settings(max_examples=60)
def test_decoder_partial_consumption_between_feeds(sizes: list[int], data: Any) -> None:
    # A consumer that takes only some of the frames ready (flow control) before the
    # next bytes arrive still gets every frame once, in order.
    stream = b"".join(encode_request(i, Op.SET, b"v" * n) for i, n in enumerate(sizes))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[int] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[start:cut])
        start = cut
        for _ in range(data.draw(st.integers(0, 2))):
            frame = next(decoder, None)
            if frame is None:
                break
            got.append(frame.request_id)
    got.extend(f.request_id for f in decoder)
    assert got == list(range(len(sizes)))
    assert decoder.buffered == 0


def test_decoder_defaults_match_the_protocol() -> None:
    assert FrameDecoder().max_frame == DEFAULT_MAX_FRAME
    assert framing.HEADER_SIZE == 4
    assert max(MsgType) == framing.MAX_MSG_TYPE


def test_decoder_byte_by_byte() -> None:
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode_request(i, Op.SET, [b"k%d" % i, b"v" * i]) for i in range(50))
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(decoder)
    assert [f.payload for f in out] == [[b"k%d" % i, b"v" * i] for i in range(50)]


def test_decoder_large_frame_through_memoryview_path() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB: decoded without slicing a copy
    (frame,) = decode_all(encode_response(7, Op.GET, value))
    assert frame.payload == value


def test_decoder_leaves_untaken_frames_buffered() -> None:
    stream = encode_request(1, Op.PING, None) + encode_request(2, Op.PING, None)
    decoder = FrameDecoder()
    decoder.feed(stream)
    assert next(decoder).request_id == 1
    assert decoder.buffered == len(stream) // 2
    assert [f.request_id for f in decoder] == [2]


# ------------------------------------------------------------------------ rejects


def test_oversized_frame_rejected_on_its_header() -> None:
    decoder = FrameDecoder(max_frame=1000)
    decoder.feed(b"\x00\x00")  # not even a whole header yet
    assert list(decoder) == []
    with pytest.raises(FrameTooLargeError):
        decoder.feed(struct.pack(">H", 1001))  # header complete, no body byte sent


def test_oversized_frame_rejected_when_it_follows_another() -> None:
    decoder = FrameDecoder(max_frame=1000)
    decoder.feed(encode_request(1, Op.PING, None) + struct.pack(">I", 10**6))
    it = iter(decoder)
    assert next(it).request_id == 1
    with pytest.raises(FrameTooLargeError):
        next(it)


def test_oversized_frame_rejected_on_feed_while_frames_are_untaken() -> None:
    decoder = FrameDecoder(max_frame=1000)
    decoder.feed(encode_request(1, Op.PING, None) + b"\x00\x01")
    assert next(decoder).request_id == 1  # the consumer stops here
    with pytest.raises(FrameTooLargeError):
        decoder.feed(b"\x00\x00")  # the next header is now whole: 65536 bytes


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    frame = encode_request(1, Op.SET, b"x" * 100)
    size = len(frame) - 4
    assert decode_all(frame, max_frame=size)[0].payload == b"x" * 100
    with pytest.raises(FrameTooLargeError):
        decode_all(frame, max_frame=size - 1)


@pytest.mark.parametrize(
    "body",
    [
        {"not": "a list"},
        [0, 1, 2],
        [0, 1, 2, None, -5],  # negative deadline
        [0, 1, 2, None, "soon"],
        [0, 1, 2, None, True],
        [0, 1, 2, None, 5, 6],
        [3, 1, 2, None],  # unknown type
        [-1, 1, 2, None],
        [0, -1, 2, None],  # negative id
        [0, 1, -2, None],
        [0, "1", 2, None],
        [0, 1, "op", None],
        [True, 1, 2, None],  # bools are not integers here
        [0, 1.0, 2, None],
        [0, 1, 2, {1: "int keys"}],  # strict_map_key
    ],
)
def test_malformed_bodies_are_protocol_errors(body: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_all(raw_frame(body))


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x01\xc1",  # reserved msgpack byte
        b"\x00\x00\x00\x02\x94\x00",  # truncated array inside the frame
        b"\x00\x00\x00\x06\x94\x00\x01\x02\xc0\xc0",  # trailing data
        b"\x00\x00\x00\x00",  # empty body
        b"\x00\x00\x00\x03\xa2\xff\xfe",  # invalid utf-8 str
    ],
)
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_all(garbage)


def test_garbage_header_is_rejected_as_too_large() -> None:
    with pytest.raises(FrameTooLargeError):
        decode_all(b"GET / HTTP/1.1\r\n")


# ------------------------------------------------------------------------ encoder


def test_encoder_refuses_oversized_frames_and_recovers() -> None:
    encoder = FrameEncoder(max_frame=100)
    with pytest.raises(FrameTooLargeError):
        encoder.encode_request(1, Op.SET, b"x" * 200)
    assert decode_all(encoder.encode_request(2, Op.PING, None))[0].request_id == 2


def test_encoder_unserialisable_payload_is_a_protocol_error_and_packer_recovers() -> None:
    encoder = FrameEncoder()
    with pytest.raises(ProtocolError):
        encoder.encode_request(1, Op.SET, [1, object()])
    with pytest.raises(ProtocolError):
        encoder.encode_request(1, Op.SET, 2**64)
    (frame,) = decode_all(encoder.encode_request(2, Op.SET, [1, 2]))
    assert frame == (0, 2, Op.SET, [1, 2], 0, None)


def test_error_with_unencodable_message_still_encodes() -> None:
    (frame,) = decode_all(encode_error(3, Op.GET, QuorumError(1, 2, "bad \udc80 surrogate")))
    rebuilt = error_from_wire(frame.payload)
    assert type(rebuilt) is ServerError and "QuorumError" in str(rebuilt)
    encoder = FrameEncoder(max_frame=100)
    (frame,) = decode_all(encoder.encode_error(4, Op.GET, ServerError("x" * 500)))
    assert type(error_from_wire(frame.payload)) is ServerError


def test_encode_helpers_accept_limits() -> None:
    with pytest.raises(FrameTooLargeError):
        limits = Limits(max_frame=300, max_key=1, max_value=1)
        encode_request(1, Op.SET, b"x" * 400, limits=limits)


# ------------------------------------------------------------------------ limits


def test_limits_defaults() -> None:
    limits = Limits()
    assert limits.max_frame == DEFAULT_MAX_FRAME == 64 * 1024 * 1024
    assert limits.max_key == DEFAULT_MAX_KEY == 64 * 1024
    assert limits.max_value == DEFAULT_MAX_VALUE == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_frame": 0}, "max_frame"),
        ({"max_key": -1}, "max_key"),
        ({"max_value": 1.5}, "max_value"),
        ({"max_frame": 2**32}, "max_frame"),
        ({"max_frame": 1000, "max_key": 10, "max_value": 990}, "max_frame"),
    ],
)
def test_limits_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Limits(**kwargs)
    assert info.value.field == field


def test_check_key() -> None:
    limits = Limits(max_frame=1000, max_key=4, max_value=10)
    assert limits.check_key(b"abcd") == b"abcd"
    assert limits.check_key(b"") == b""
    with pytest.raises(KeyTooLargeError):
        limits.check_key(b"abcde")
    for bad in ("abc", bytearray(b"abc"), 1, None):
        with pytest.raises(ProtocolError):
            limits.check_key(bad)


def test_check_value() -> None:
    limits = Limits(max_frame=1000, max_key=4, max_value=10)
    for ok in (b"x" * 10, bytearray(10), memoryview(b"x" * 10)):
        assert limits.check_value(ok) is ok
    for big in (b"x" * 11, bytearray(11), memoryview(bytes(11))):
        with pytest.raises(ValueTooLargeError):
            limits.check_value(big)
    with pytest.raises(ValueTooLargeError):
        limits.check_value(memoryview(bytes(16)).cast("I"))  # 4 items, 16 bytes
    for bad in ("text", 1, None, [b"x"]):
        with pytest.raises(ProtocolError):
            limits.check_value(bad)


# ------------------------------------------------------------------------ handshake


def test_validate_hello_accepts_and_normalises() -> None:
    hello = make_hello("prod", node_id="n1", address="10.0.0.1:7000", auth="s", info={"a": 1})
    assert validate_hello(hello, cluster="prod", auth="s") == {
        "version": PROTOCOL_VERSION,
        "cluster": "prod",
        "node_id": "n1",
        "address": "10.0.0.1:7000",
        "info": {"a": 1},
        "features": frozenset(),
    }
    # a server without a token ignores the peer's
    assert validate_hello(hello, cluster="prod", auth=None)["node_id"] == "n1"
    # a client: no node id, no address, no info, no features (a previous version's)
    minimal = {"version": PROTOCOL_VERSION, "cluster": "prod"}
    assert validate_hello(minimal, cluster="prod", auth=None)["info"] == {}
    assert validate_hello(minimal, cluster="prod", auth=None)["features"] == frozenset()
    # a client that reads compressed values says so
    client = make_hello("prod", features=(FEATURE_COMPRESSION,))
    assert validate_hello(client, cluster="prod", auth=None)["features"] == {FEATURE_COMPRESSION}
    with pytest.raises(HandshakeError, match="features"):
        validate_hello({**minimal, "features": "zstd"}, cluster="prod", auth=None)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": PROTOCOL_VERSION + 1}, "version"),
        ({"version": None}, "version"),
        ({"version": True}, "version"),
        ({"cluster": "other"}, "cluster"),
        ({"auth": "wrong"}, "auth"),
        ({"auth": None}, "auth"),
        ({"node_id": 5}, "node_id"),
        ({"address": b"bytes"}, "address"),
        ({"info": [1]}, "info"),
    ],
)
def test_validate_hello_rejects(change: dict[str, Any], match: str) -> None:
    hello = {**make_hello("prod", auth="secret"), **change}
    with pytest.raises(HandshakeError, match=match):
        validate_hello(hello, cluster="prod", auth="secret")


def test_validate_hello_rejects_non_maps() -> None:
    bad: object
    for bad in (None, [], "hello"):
        with pytest.raises(HandshakeError):
            validate_hello(bad, cluster="c", auth=None)
        with pytest.raises(HandshakeError):
            validate_hello_answer(bad, cluster="c")


def test_validate_hello_answer() -> None:
    answer = {"version": PROTOCOL_VERSION, "cluster": "c", "node_id": "n", "info": {"x": 1}}
    assert validate_hello_answer(answer, cluster="c") == {
        **answer,
        "clock_ms": None,
        "features": frozenset(),
    }
    timed = {**answer, "clock_ms": 1_800_000_000_000}
    assert validate_hello_answer(timed, cluster="c") == {**timed, "features": frozenset()}
    featured = {**timed, "features": ["trace", "future"]}
    assert validate_hello_answer(featured, cluster="c")["features"] == {"trace", "future"}
    with pytest.raises(HandshakeError, match="features"):
        validate_hello_answer({**timed, "features": "trace"}, cluster="c")
    for bad_clock in (0, -1, "now", 1.5, True):
        with pytest.raises(HandshakeError, match="clock_ms"):
            validate_hello_answer({**answer, "clock_ms": bad_clock}, cluster="c")
    with pytest.raises(HandshakeError, match="cluster"):
        validate_hello_answer(answer, cluster="d")
    with pytest.raises(HandshakeError, match="version"):
        validate_hello_answer({**answer, "version": 0}, cluster="c")


def test_prepare_hello() -> None:
    assert prepare_hello({"cluster": "c"}) == {"cluster": "c", "version": PROTOCOL_VERSION}
    assert prepare_hello({"cluster": "c", "version": 9})["version"] == 9
    with pytest.raises(ConfigError, match="hello"):
        prepare_hello({})


# ------------------------------------------------------------------------ addresses, options


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("node-a:0", ("node-a", 0)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_addresses_round_trip(text: str, parsed: tuple[str, int]) -> None:
    assert parse_hostport(text) == parsed
    assert format_hostport(*parsed) == text


@pytest.mark.parametrize("bad", ["", "host", ":80", "host:", "host:http", "h:70000", "::1:80"])
def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hostport(bad)
    assert info.value.field == "address"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cluster": ""}, "cluster"),
        ({"cluster": "c", "max_inflight": 0}, "max_inflight"),
        ({"cluster": "c", "max_connections": -1}, "max_connections"),
        ({"cluster": "c", "handshake_timeout": 0}, "handshake_timeout"),
        ({"cluster": "c", "close_grace": "1"}, "close_grace"),
    ],
)
def test_server_options_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerOptions(**kwargs)
    assert info.value.field == field


def test_deadline_offset_errs_on_the_early_side() -> None:
    # The server read its clock (1000) at some moment between our send and our
    # receipt (at 1005 by our clock): the offset assumes the latest moment.
    assert clock_offset_ms({"clock_ms": 1000}, 1005) == -5
    assert clock_offset_ms({"clock_ms": None}, 1005) is None
    assert request_deadline(None, 1.0) == 0
    assert request_deadline(0, math.inf) == 0
    before = wall_clock_ms()
    deadline = request_deadline(-5, 2.0)
    after = wall_clock_ms()
    # 2 s from now on the server's clock, one ms early for truncation.
    assert before - 5 + 2000 - 1 <= deadline <= after - 5 + 2000 - 1
