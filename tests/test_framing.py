"""The frame decoder's pre-scan: decode budget, ext types, depth, truncation.

The compiled scan is checked against ``model_scan``, a plain Python reading of the
documented rules and prices (framing.pyi), written independently of the C loop.
"""

from __future__ import annotations

import itertools
import re
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypercache._core.framing import BUDGET_BASE, BUDGET_PER_BYTE, MAX_DEPTH
from hypercache.errors import FrameTooLargeError, ProtocolError
from hypercache.net.protocol import Frame, FrameDecoder, FrameEncoder, MsgType, Op

MiB = 1024 * 1024

# ------------------------------------------------------------------------ the model

# Prices of framing.pyi, in bytes.
LIST, SLOT, DICT, TABLE, ENTRY = 64, 8, 64, 32, 128
INT, BIGINT, FLOAT, BYTES, STR, STR_BYTE = 32, 48, 32, 48, 80, 5

_EXT = {0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}
# type byte -> (size of the whole value, price) for the fixed-size scalars
_FIXED = {
    0xC0: (1, 0),
    0xC2: (1, 0),
    0xC3: (1, 0),
    0xCA: (5, FLOAT),
    0xCB: (9, FLOAT),
    0xCC: (2, 0),
    0xCD: (3, INT),
    0xCE: (5, INT),
    0xD1: (3, INT),
    0xD2: (5, INT),
    0xD3: (9, BIGINT),
}


class _Refused(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


def budget(size: int) -> int:
    return BUDGET_PER_BYTE * size + BUDGET_BASE


def model_scan(body: bytes) -> tuple[str | None, int, int]:
    """``(error, cost, objects)`` of a body: ``error`` is None or one of
    truncated, trailing, ext, reserved, deep; cost and objects are meaningful
    without an error only."""
    state = {"pos": 0, "cost": 0, "objects": 0}

    def take(k: int) -> bytes:
        pos = state["pos"]
        if pos + k > len(body):
            raise _Refused("truncated")
        state["pos"] = pos + k
        return body[pos : pos + k]

    def uint(k: int) -> int:
        return int.from_bytes(take(k), "big")

    def value(level: int) -> None:
        b = take(1)[0]
        state["objects"] += 1
        price = 0
        if b <= 0x7F:
            pass
        elif b >= 0xE0:
            price = 0 if b - 0x100 >= -5 else INT
        elif b in _FIXED:
            size, price = _FIXED[b]
            take(size - 1)
        elif b == 0xCF:
            price = BIGINT if uint(8) >= 2**60 else INT
        elif b == 0xD0:
            price = 0 if struct.unpack(">b", take(1))[0] >= -5 else INT
        elif b == 0xC1:
            raise _Refused("reserved")
        elif b in _EXT:
            raise _Refused("ext")
        elif 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
            if 0xA0 <= b <= 0xBF:
                n = b & 0x1F
            else:
                n = uint({0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}[b])
            take(n)
            if n > 1:
                price = BYTES + n if b in (0xC4, 0xC5, 0xC6) else STR + STR_BYTE * n
        else:
            is_map = 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)
            n = b & 0x0F if b <= 0x9F else uint(2 if b in (0xDC, 0xDE) else 4)
            if level == MAX_DEPTH:
                raise _Refused("deep")
            # An item takes a byte at least, a key and its value two.
            if n * (2 if is_map else 1) > len(body) - state["pos"]:
                raise _Refused("truncated")
            state["cost"] += (
                DICT + (TABLE if n else 0) + ENTRY * n if is_map else LIST + SLOT * (n + n % 2)
            )
            for _ in range(2 * n if is_map else n):
                value(level + 1)
            return
        state["cost"] += price

    try:
        value(0)
    except _Refused as refused:
        return refused.why, state["cost"], state["objects"]
    if state["pos"] != len(body):
        return "trailing", state["cost"], state["objects"]
    return None, state["cost"], state["objects"]


# ------------------------------------------------------------------------ helpers

_SCAN_ERRORS = {
    "truncated": "ends inside a msgpack value",
    "trailing": "has trailing bytes",
    "ext": "ext type",
    "reserved": "reserved msgpack byte",
    "deep": f"deeper than {MAX_DEPTH}",
}
_OVER = re.compile(
    r"frame of (\d+) bytes would decode to (\d+) objects of about (\d+) bytes, "
    r"over the budget of (\d+) bytes"
)

_pack = msgpack.Packer(use_bin_type=True, datetime=False, autoreset=True).pack


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request_body(payload: bytes) -> bytes:
    """A REQUEST body ``[0, 1, 2, payload]`` around an already packed payload."""
    return b"\x94\x00\x01\x02" + payload


def array32(items: bytes, count: int) -> bytes:
    return b"\xdd" + struct.pack(">I", count) + items


def decode_one(body: bytes) -> Frame:
    decoder = FrameDecoder()
    decoder.feed(framed(body))
    frame = next(decoder)
    assert decoder.buffered == 0
    return frame


def refusal(body: bytes) -> ProtocolError:
    decoder = FrameDecoder()
    decoder.feed(framed(body))
    with pytest.raises(ProtocolError) as info:
        next(decoder)
    return info.value


def over_budget(body: bytes) -> tuple[int, int, int]:
    """``(objects, cost, budget)`` from the refusal of an over-budget body."""
    match = _OVER.search(str(refusal(body)))
    assert match is not None
    assert int(match[1]) == len(body)
    return int(match[2]), int(match[3]), int(match[4])


# ------------------------------------------------------------------------ adversarial

# 8 MiB payloads that cost 15 to 96 times their size decoded (RSS before the scan:
# ~590 MB for the empty arrays, ~770 MB for the map chains).
ADVERSARIAL = {
    "empty arrays": b"\x90",
    "empty maps": b"\x80",
    "nested [[[]]]": b"\x91\x91\x90",
    "chains of 61 maps": b"\x81\xa0" * 60 + b"\x80",
    "maps {'': nil}": b"\x81\xa0\xc0",
    "ints -32": b"\xe0",
    "2-byte bins": b"\xc4\x02xy",
    "2-byte strs": b"\xa2xy",
}


@pytest.mark.parametrize("item", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_an_adversarial_frame_is_refused_before_anything_is_decoded(item: bytes) -> None:
    count = (8 * MiB) // len(item)
    body = request_body(array32(item * count, count))
    decoder = FrameDecoder()
    decoder.feed(framed(body))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="would decode to") as info:
            next(decoder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # the message, not the objects
    objects = int(re.findall(r"to (\d+) objects", str(info.value))[0])
    assert objects > count  # the whole body was priced
    # The decoder is left unusable as documented: the frame stays, and refuses again.
    assert decoder.buffered == len(body) + 4
    with pytest.raises(ProtocolError, match="would decode to"):
        next(decoder)


def test_the_refusal_names_size_objects_price_and_budget() -> None:
    count = 200_000
    body = request_body(array32(b"\x90" * count, count))
    objects, cost, limit = over_budget(body)
    assert objects == 4 + 1 + count
    assert cost == LIST + SLOT * 4 + LIST + SLOT * count + LIST * count
    assert limit == budget(len(body)) == 12 * len(body) + 8 * MiB


@pytest.mark.parametrize(
    "filler",
    [b"\x90", b"\x81\xa0\x80", b"\xc4\x02xy", b"\xe0"],
    ids=["arrays", "maps", "bins", "ints"],
)
def test_a_body_exactly_at_its_budget_passes_and_one_over_is_refused(filler: bytes) -> None:
    # [0, 1, 2, [filler * n, nil * pads]]: fillers are priced over the budget's 12 a
    # byte, a nil at 8 (its slot) for 12 more budget, so some (n, pads) lands on the
    # budget exactly. Prices add up, so the excess is computed from the model's
    # price of one filler, not by walking 100 000 items in Python.
    price = model_scan(filler)[1]
    head = len(request_body(array32(b"", 0)))

    def body(n: int, pads: int) -> bytes:
        return request_body(array32(filler * n + b"\xc0" * pads, n + pads))

    def cost(n: int, pads: int) -> int:
        m = n + pads
        return LIST + 4 * SLOT + LIST + SLOT * (m + m % 2) + n * price

    def excess(n: int, pads: int) -> int:
        return cost(n, pads) - budget(head + n * len(filler) + pads)

    n = next(n for n in itertools.count(0, 1000) if excess(n, 0) > 0)
    pads = 0
    while True:
        # Each nil lowers the excess by 4 on average (+4 and -12 in turn): skip most
        # of the way, then look for an exact fit among the next few.
        while (over := excess(n, pads)) > 32:
            pads += max(1, (over - 32) // 8)
        fit = next((q for q in range(pads, pads + 16) if excess(n, q) == 0), None)
        if fit is not None:
            pads = fit
            break
        n += 1
    assert model_scan(body(3, 5))[1] == cost(3, 5)  # the shortcut is the model
    frame = decode_one(body(n, pads))
    assert len(frame.payload) == n + pads
    assert frame.payload[-1] is None
    objects, refused_cost, limit = over_budget(body(n + 1, pads))
    assert (refused_cost, limit) == (cost(n + 1, pads), budget(len(body(n + 1, pads))))
    assert refused_cost > limit
    assert objects == 4 + 1 + n + 1 + pads + (model_scan(filler)[2] - 1) * (n + 1)


# ------------------------------------------------------------------------ other refusals


@pytest.mark.parametrize(
    "ext",
    [
        b"\xd4\x01\x00",  # fixext 1
        b"\xd5\x01" + b"\x00" * 2,
        b"\xd6\xff" + b"\x00" * 4,  # the timestamp type
        b"\xd7\x01" + b"\x00" * 8,
        b"\xd8\x01" + b"\x00" * 16,
        b"\xc7\x00\x01",  # ext 8, empty
        b"\xc8\x00\x01\x01\x00",
        b"\xc9\x00\x00\x00\x01\x01\x00",
        _pack(msgpack.ExtType(5, b"data")),
        _pack(msgpack.Timestamp(1, 0)),
    ],
)
def test_an_ext_type_is_refused_wherever_it_is(ext: bytes) -> None:
    for payload in (ext, b"\x92\x01" + ext, b"\x81\xa1k" + ext):
        with pytest.raises(
            ProtocolError, match=r"ext type at offset \d+ \(the protocol uses none\)"
        ):
            decode_one(request_body(payload))


def test_the_reserved_byte_is_refused_by_the_scan() -> None:
    with pytest.raises(ProtocolError, match="reserved msgpack byte 0xc1 at offset 4"):
        decode_one(request_body(b"\xc1"))


@pytest.mark.parametrize(("opener", "closer"), [(b"\x91", b"\x90"), (b"\x81\xa0", b"\x80")])
def test_nesting_up_to_max_depth_passes_and_one_deeper_is_refused(
    opener: bytes, closer: bytes
) -> None:
    assert MAX_DEPTH == 64
    # The body's array is level 1, so the payload may nest 63 containers, the
    # innermost one empty.
    ok = request_body(opener * 62 + closer)
    payload = decode_one(ok).payload
    for _ in range(62):
        payload = payload[0] if isinstance(payload, list) else payload[""]
    assert payload in ([], {})
    with pytest.raises(ProtocolError, match="deeper than 64"):
        decode_one(request_body(opener * 63 + closer))
    # msgpack's own limit (1024 levels) is never reached
    with pytest.raises(ProtocolError, match="deeper than 64"):
        decode_one(request_body(opener * 5000 + closer))


def test_every_truncation_and_any_trailing_byte_is_refused_by_the_scan() -> None:
    body = FrameEncoder().encode_body(
        MsgType.REQUEST,
        7,
        Op.R_PUT_MANY,
        [[[b"key", b"v" * 300, 2**60 + 1, 2**32 - 1, -(2**40), True]], 1.5, "é", {"m": None}],
    )
    for cut in range(len(body)):
        with pytest.raises(ProtocolError, match="ends inside a msgpack value"):
            decode_one(body[:cut])
    for extra in (b"\x00", b"\xc0\xc0", body):
        with pytest.raises(ProtocolError, match=rf"trailing bytes .* offset {len(body)}"):
            decode_one(body + extra)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xdd\xff\xff\xff\xff",  # array 32 of 4G items, none there
        b"\xdf\xff\xff\xff\xff\x01",  # map 32 of 4G pairs
        b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
        b"\xdb\x00\x00\x01\x00abc",  # str 32 of 256 bytes, 3 there
        b"\xcf\x00\x00",  # a uint 64 cut short
        b"\xd0",  # an int 8 without its byte
        b"\xcb\x00",  # a float 64 cut short
    ],
)
def test_a_header_claiming_more_than_the_body_holds_is_truncated(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="ends inside a msgpack value"):
        decode_one(request_body(payload))


# ------------------------------------------------------------------------ legitimate traffic

_TS = 1_764_000_000_000 << 16 | 1234  # an HLC timestamp: a 9-byte uint64
_ORIGIN = 0xDEADBEEF  # an origin tag: a 5-byte uint32


def _keys_answer(key_len: int, rows: int) -> list[Any]:
    return [[[[i.to_bytes(8, "big")[-key_len:], _TS + i, _ORIGIN] for i in range(rows)], [1, 2]]]


def _topology(partitions: int, replication: int) -> dict[str, Any]:
    return {
        "epoch": 7,
        "partitions": partitions,
        "replication": replication,
        "nodes": [[f"node-{i}", f"10.0.0.{i}:7400"] for i in range(16)],
        "table": [[(p + j) % 16 for j in range(replication)] for p in range(partitions)],
        "read_consistency": "quorum",
    }


def _entry(key: bytes, value: bytes) -> list[Any]:
    return [key, value, _TS, _ORIGIN, 0, False]


# The protocol's payloads at the largest size they reach, densest shapes first.
LEGITIMATE: dict[str, Callable[[], tuple[int, int, Any]]] = {
    # anti-entropy: KEYS answers list whole sub-buckets, with no bound on the rows
    "KEYS answer, 4-byte keys, 8 MiB": lambda: (1, Op.KEYS, _keys_answer(4, 8 * MiB // 22)),
    "KEYS answer, every 2-byte key": lambda: (1, Op.KEYS, _keys_answer(2, 65536)),
    "KEYS answer with tombstone rows": lambda: (
        1,
        Op.KEYS,
        [[[[b"key-%04d" % i, _TS, _ORIGIN, True, 1_764_000_000_000] for i in range(20_000)], []]],
    ),
    "KEYS request, 1 MiB of terms": lambda: (
        0,
        Op.KEYS,
        [[p, b, bytes(8 * 64)] for p in range(64) for b in range(32)],
    ),
    "MERKLE level 0, 65536 partitions": lambda: (
        0,
        Op.MERKLE,
        [0, [[g, 0xFFFF, 2**64 - 1 - g] for g in range(4096)]],
    ),
    "MERKLE level 0 answer, 65536 partitions": lambda: (
        1,
        Op.MERKLE,
        [[g, [2**64 - 1 - i for i in range(16)]] for g in range(4096)],
    ),
    "MERKLE level 1, 64 partitions": lambda: (
        0,
        Op.MERKLE,
        [1, [[p, 999, bytes(32)] for p in range(64)]],
    ),
    "MERKLE level 1 answer, listings": lambda: (
        1,
        Op.MERKLE,
        [[p, 1, [[b"key-%04d" % i, _TS, _ORIGIN] for i in range(16)]] for p in range(64)],
    ),
    "MERKLE level 1 answer, blocks": lambda: (
        1,
        Op.MERKLE,
        [[p, 0, 0xFF, bytes(256)] for p in range(64)],
    ),
    "PULL request, 512 keys": lambda: (0, Op.PULL, [b"key-%08d" % i for i in range(512)]),
    "PULL answer, 512 tiny entries": lambda: (
        1,
        Op.PULL,
        [_entry(b"%02d" % (i % 100), b"vv") for i in range(512)],
    ),
    "PULL answer, 4 MiB": lambda: (
        1,
        Op.PULL,
        [_entry(b"key-%04d" % i, bytes(8000)) for i in range(512)],
    ),
    "R_PUT_MANY, 512 tiny entries": lambda: (
        0,
        Op.R_PUT_MANY,
        [[_entry(b"%02d" % (i % 100), b"vv") for i in range(512)], 1],
    ),
    "R_PUT_MANY, hint_replay_batch raised to 100k": lambda: (
        0,
        Op.R_PUT_MANY,
        [[_entry(b"k%05d" % i, b"vv") for i in range(100_000)], 0],
    ),
    # client face
    "TOPOLOGY answer, 4096 x 3": lambda: (1, Op.TOPOLOGY, _topology(4096, 3)),
    "TOPOLOGY answer, 65536 x 1": lambda: (1, Op.TOPOLOGY, _topology(65536, 1)),
    "TOPOLOGY answer, 65536 x 3": lambda: (1, Op.TOPOLOGY, _topology(65536, 3)),
    "SET, 32 MiB value": lambda: (0, Op.SET, [b"key", bytes(32 * MiB), 60_000, "quorum"]),
    "GET answer, 1 MiB value": lambda: (1, Op.GET, [True, bytes(MiB)]),
    "R_GET answer": lambda: (1, Op.R_GET, [b"v" * 100, _TS, _ORIGIN, 0, False]),
    "HELLO with a member list": lambda: (
        0,
        Op.HELLO,
        {
            "version": 1,
            "cluster": "prod",
            "node_id": "node-1",
            "address": "10.0.0.1:7400",
            "auth": "secret",
            "info": {"members": [[f"node-{i}", f"10.0.0.{i}:7400"] for i in range(200)]},
        },
    ),
    "ERROR": lambda: (2, Op.GET, [10, "ServerError: " + "x" * 1000, []]),
}


@pytest.mark.parametrize("case", list(LEGITIMATE.values()), ids=list(LEGITIMATE))
def test_every_legitimate_frame_at_its_largest_is_accepted(
    case: Callable[[], tuple[int, int, Any]],
) -> None:
    msg_type, op, payload = case()
    body = FrameEncoder().encode_body(msg_type, 99, op, payload)
    frame = decode_one(body)
    assert frame == (msg_type, 99, op, payload, 0, None)


@pytest.mark.parametrize("key_len", range(2, 65))
def test_a_keys_row_is_priced_under_the_budget_rate_for_any_key_of_two_bytes(
    key_len: int,
) -> None:
    # KEYS answers have no bound on their rows: the rate of one row must stay under
    # BUDGET_PER_BYTE, whatever the answer's length.
    row = _pack([b"k" * key_len, _TS, _ORIGIN])
    error, cost, _ = model_scan(b"\x91" + row)
    assert error is None
    price = cost - (LIST + 2 * SLOT) + SLOT  # the row and its slot in the rows list
    assert price < BUDGET_PER_BYTE * len(row)
    # ... and so is a hint replayed with a 2-byte value, or a tombstone row.
    for other in (
        [b"k" * key_len, b"vv", _TS, _ORIGIN, 0, False],
        [b"k" * key_len, _TS, _ORIGIN, True, 1_764_000_000_000],
    ):
        packed = _pack(other)
        cost = model_scan(b"\x91" + packed)[1] - (LIST + 2 * SLOT) + SLOT
        assert cost < BUDGET_PER_BYTE * len(packed)


def test_a_body_of_73_kib_is_never_refused_for_its_shape() -> None:
    # The costliest bytes there are: chains of one-key maps, {"": {"": ...}}, priced
    # 224 for 2 bytes.
    chain = b"\x81\xa0" * 60 + b"\x80"
    count = 73 * 1024 // len(chain)
    body = request_body(array32(chain * count, count))
    error, cost, _ = model_scan(body)
    assert error is None
    assert cost > 110 * len(body)
    payload = decode_one(body).payload
    assert len(payload) == count
    assert payload[0][""][""] == {"": payload[0][""][""][""]}


# ------------------------------------------------------------------------ random payloads

# Everything msgpack carries losslessly with the protocol's options, with the ints
# on both sides of every boundary of the format and of CPython's small-int cache.
_int_edges = [
    -(2**63),
    -(2**31) - 1,
    -(2**31),
    -32769,
    -32768,
    -129,
    -128,
    -33,
    -32,
    -6,
    -5,
    -1,
    0,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**30,
    2**32 - 1,
    2**32,
    2**60 - 1,
    2**60,
    2**64 - 1,
]
scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from(_int_edges)
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF), max_size=4)
    | st.binary(max_size=300)
)
payloads = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=20) | st.dictionaries(st.text(max_size=8), children, max_size=8)
    ),
    max_leaves=60,
)


@given(payload=payloads)
@settings(max_examples=300)
def test_a_random_payload_passes_the_scan_and_decodes_to_what_was_packed(payload: Any) -> None:
    body = FrameEncoder().encode_body(MsgType.RESPONSE, 5, Op.GET, payload)
    assert model_scan(body)[0] is None
    assert decode_one(body) == (MsgType.RESPONSE, 5, Op.GET, payload, 0, None)


@given(payload=payloads)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_the_scan_prices_every_object_as_documented(payload: Any) -> None:
    # A fixed filler of empty arrays takes the body over its budget, so the refusal
    # tells the scan's price and count of the random part too.
    filler = 150_000
    packed = _pack(payload)
    body = request_body(b"\x92" + packed + array32(b"\x90" * filler, filler))
    error, model_cost, model_objects = model_scan(packed)
    assert error is None
    objects, cost, limit = over_budget(body)
    assert objects == 4 + 1 + model_objects + 1 + filler
    assert cost == LIST + 4 * SLOT + LIST + 2 * SLOT + model_cost + LIST + SLOT * filler + (
        LIST * filler
    )
    assert limit == budget(len(body))


# One value of every msgpack format the scan accepts, with non-minimal encodings
# (which the packer never makes, a peer may) and each side of every price boundary.
ATOMS = [
    *(bytes([b]) for b in (0x00, 0x7F, 0xE0, 0xFA, 0xFB, 0xFF, 0xC0, 0xC2, 0xC3)),
    b"\xcc\xff",
    b"\xcd\x01\x00",
    b"\xcd\x00\x01",
    b"\xce\xff\xff\xff\xff",
    b"\xcf" + (2**60 - 1).to_bytes(8, "big"),
    b"\xcf" + (2**60).to_bytes(8, "big"),
    b"\xcf" + (1).to_bytes(8, "big"),
    b"\xd0\xfb",
    b"\xd0\xfa",
    b"\xd0\x05",
    b"\xd0\x80",
    b"\xd1\xff\xff",
    b"\xd2\x80\x00\x00\x00",
    b"\xd3" + (2**63 - 1).to_bytes(8, "big"),
    b"\xd3\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xca" + struct.pack(">f", 1.5),
    b"\xcb" + struct.pack(">d", -0.5),
    b"\xc4\x00",
    b"\xc4\x01x",
    b"\xc4\x02xy",
    b"\xc5\x00\x02xy",
    b"\xc6\x00\x00\x01\x00" + bytes(256),
    b"\xa0",
    b"\xa1x",
    b"\xa2xy",
    b"\xbf" + b"x" * 31,
    b"\xd9\x02xy",
    b"\xda\x00\x00",
    b"\xdb\x00\x00\x00\x03\xe2\x82\xac",
    b"\x90",
    b"\x91\x00",
    b"\x92\x00\x00",
    b"\x93\x90\x80\xc0",
    b"\xdc\x00\x00",
    b"\xdc\x00\x01\x90",
    b"\xdd\x00\x00\x00\x03\x00\x00\x00",
    b"\x80",
    b"\x81\xa0\xc0",
    b"\x82\xa1a\x90\xa1b\x80",
    b"\xde\x00\x00",
    b"\xde\x00\x01\xc4\x01k\xc0",
    b"\xdf\x00\x00\x00\x01\x01\x01",  # an int key: priced, then refused by msgpack
]


@pytest.mark.parametrize("atom", ATOMS, ids=[a[:6].hex() for a in ATOMS])
def test_each_msgpack_format_is_priced_as_documented(atom: bytes) -> None:
    filler = 150_000
    body = request_body(b"\x92" + atom + array32(b"\x90" * filler, filler))
    error, model_cost, model_objects = model_scan(atom)
    assert error is None
    objects, cost, _ = over_budget(body)
    assert objects == 4 + 1 + model_objects + 1 + filler
    assert cost == LIST + 4 * SLOT + LIST + 2 * SLOT + model_cost + LIST + SLOT * filler + (
        LIST * filler
    )


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes changed, cut, inserted or appended."""
    out = bytearray(FrameEncoder().encode_body(MsgType.REQUEST, 1, Op.SET, draw(payloads)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        at = draw(st.integers(0, len(out)))
        if kind == "flip" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=6))
        else:
            out += draw(st.binary(min_size=1, max_size=6))
    return bytes(out)


@given(body=st.binary(max_size=80) | mutated_bodies())
@settings(max_examples=400)
def test_random_bytes_are_a_protocol_error_or_a_frame_and_the_scan_agrees_with_the_model(
    body: bytes,
) -> None:
    decoder = FrameDecoder()
    decoder.feed(framed(body))
    error = model_scan(body)[0]
    try:
        frame = next(decoder)
    except ProtocolError as exc:
        message = str(exc)
        if error is None:
            assert "undecodable frame body of" not in message
            # What msgpack refuses then is a value the scan cannot judge (bad UTF-8,
            # a map key that is not str or bin) or a body of the wrong shape, never
            # its structure.
            try:
                msgpack.unpackb(body)
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                pytest.fail("the scan passed a body msgpack finds malformed")
            except ValueError as unpack_error:
                assert "incomplete" not in str(unpack_error)
            except TypeError:
                pass  # e.g. an unhashable map key
        else:
            assert f"undecodable frame body of {len(body)} bytes" in message
            assert _SCAN_ERRORS[error] in message
        return
    assert error is None
    assert isinstance(frame, Frame)
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    "stream, says",
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "answered in HTTP ('HTTP/...')"),
        (b"GET /health HTTP/1.1\r\n", "sent an HTTP request ('GET' ...)"),
        (b"POST /cluster/leave HTTP/1.1\r\n", "sent an HTTP request ('POST' ...)"),
        (b"SSH-2.0-OpenSSH\r\n", "its length header is the text 'SSH-'"),
        (b"\xff\xff\xff\xff", "frame of 4294967295 bytes exceeds max_frame=1024"),
    ],
)
@pytest.mark.parametrize("way", ["feed", "iterate"])
def test_a_stream_that_is_not_hypercache_says_what_it_looks_like(
    stream: bytes, says: str, way: str
) -> None:
    dec = FrameDecoder(1024)
    with pytest.raises(FrameTooLargeError) as info:
        if way == "feed":
            dec.feed(stream)
        else:
            # feed checks the header at the front; the one after a good frame is
            # checked as the iteration reaches it
            dec.feed(FrameEncoder(1024).encode_request(1, Op.PING, None) + stream)
            next(dec)
            next(dec)
    assert says in str(info.value)
