"""Value compression (hypercache.client.compression): the codec alone, then
compressing and uncompressing clients against a real cluster."""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path

import pytest
import zstandard
from cluster_harness import running_cluster

from hypercache import Client
from hypercache._core.hlc import make_ts
from hypercache.client.compression import (
    MARK,
    Compression,
    ValueCodec,
    parse_compression,
    resolve_compression,
)
from hypercache.cluster.local import wait_for
from hypercache.errors import ConfigError, ProtocolError, ValueTooLargeError
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import FEATURE_COMPRESSION, Op, make_hello
from hypercache.replication import wall_ms

MAX = 1 << 20
JSONISH = json.dumps(
    [{"id": i, "name": f"user-{i}", "tags": ["a", "b"], "active": i % 2 == 0} for i in range(200)]
).encode()


def codec(**kw: int) -> ValueCodec:
    return ValueCodec(Compression(**kw), MAX)


def test_compressible_values_shrink_and_come_back() -> None:
    c = codec()
    stored = c.encode(JSONISH)
    assert stored[0] == MARK and len(stored) * 3 < len(JSONISH)
    assert c.decode(stored) == JSONISH
    # Any client decodes, whatever its own setting.
    assert ValueCodec(None, MAX).decode(stored) == JSONISH


def test_small_incompressible_and_empty_values_stay_raw() -> None:
    c = codec(min_size=1024)
    small = JSONISH[:1000]
    assert c.encode(small) == small
    noise = os.urandom(64 * 1024)
    assert c.encode(noise) == noise  # never expanded
    assert c.encode(b"") == b""
    assert c.decode(b"") == b""
    assert codec(min_size=0).encode(b"") == b""


def test_a_raw_value_that_begins_with_the_mark_is_escaped() -> None:
    for c in (codec(), ValueCodec(None, MAX)):
        raw = b"\xc1\x01 looks compressed"
        stored = c.encode(raw)
        assert stored == b"\xc1\x00" + raw
        assert c.decode(stored) == raw


def _bomb(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes (which announces its size)."""
    return zstandard.ZstdCompressor().compress(b"\x00" * size)


def test_decompression_bombs_are_refused() -> None:
    c = ValueCodec(Compression(), 64 * 1024)
    big = 10 * 1024 * 1024
    # Declared over max_value: refused before anything is decompressed.
    declared = b"\xc1\x01" + struct.pack(">I", big) + _bomb(big)
    with pytest.raises(ValueTooLargeError, match="declares"):
        c.decode(declared)
    # Declared small, but the frame announces more.
    with pytest.raises(ValueTooLargeError, match="announces"):
        c.decode(b"\xc1\x01" + struct.pack(">I", 100) + _bomb(big))
    # Declared small, a frame that does not say: decompressed one byte past, no more.
    stream = zstandard.ZstdCompressor(write_content_size=False)
    frame = stream.compressobj()
    unannounced = frame.compress(b"\x00" * big) + frame.flush()
    with pytest.raises(ValueTooLargeError, match="past its declared"):
        c.decode(b"\xc1\x01" + struct.pack(">I", 100) + unannounced)


def test_malformed_compressed_values_are_protocol_errors() -> None:
    c = codec()
    with pytest.raises(ProtocolError):
        c.decode(b"\xc1\x01\x00\x00\x00\x05not zstd")
    with pytest.raises(ProtocolError, match="unknown encoding"):
        c.decode(b"\xc1\x07")
    short = b"\xc1\x01" + struct.pack(">I", 10) + zstandard.ZstdCompressor().compress(b"abc")
    with pytest.raises(ProtocolError, match="declared"):
        c.decode(short)


def test_compression_settings_are_checked() -> None:
    assert resolve_compression("off") is None
    assert resolve_compression(None) is None
    assert resolve_compression("zstd") == Compression()
    assert resolve_compression(Compression(level=9)).level == 9  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="compression"):
        resolve_compression("gzip")
    with pytest.raises(ConfigError, match="level"):
        Compression(level=0)
    with pytest.raises(ConfigError, match="min_size"):
        Compression(min_size=-1)
    with pytest.raises(ConfigError, match="compression"):
        Client("127.0.0.1:1", compression="lz4")
    # The URL form (backends, tiered caches).
    assert parse_compression("off") is None
    assert parse_compression("zstd") == Compression()
    assert parse_compression("ZSTD:9") == Compression(level=9)
    for bad in ("zstd:", "zstd:x", "lz4:3", "gzip"):
        with pytest.raises(ConfigError, match="compression"):
            parse_compression(bad)
    with pytest.raises(ConfigError, match="level"):
        parse_compression("zstd:23")


def test_a_negotiating_codec_compresses_once_a_server_takes_it() -> None:
    c = ValueCodec(Compression(), MAX, negotiate=True)
    assert c.active is None and c.pending(JSONISH) and not c.pending(b"small")
    assert c.encode(JSONISH) == JSONISH  # nobody said yet
    c.learn(frozenset({FEATURE_COMPRESSION, "trace"}))
    assert c.active == Compression() and not c.pending(JSONISH)
    assert c.encode(JSONISH)[0] == MARK
    # A node without the feature: raw for good, whatever the next ones say.
    c.learn(frozenset({"trace"}))
    c.learn(frozenset({FEATURE_COMPRESSION}))
    assert c.active is None and not c.pending(JSONISH)
    assert c.encode(JSONISH) == JSONISH
    assert c.decode(ValueCodec(Compression(), MAX).encode(JSONISH)) == JSONISH
    off = ValueCodec(None, MAX, negotiate=True)
    off.learn(frozenset({FEATURE_COMPRESSION}))
    assert off.active is None and not off.pending(JSONISH)


@pytest.mark.functional
def test_compressing_and_plain_clients_share_a_cluster(tmp_path: Path) -> None:
    value = json.loads(JSONISH)
    noise = os.urandom(8192)
    with running_cluster(3, tmp_path, ("--replication", "3")) as cluster:
        with (
            Client(cluster.addresses, timeout=10.0) as zclient,
            Client(cluster.addresses, timeout=10.0, compression="off") as plain,
        ):
            zclient.set("j", value, consistency="all")
            plain.set("p", value, consistency="all")
            zclient.set("noise", noise, consistency="all")
            zclient.set("empty", b"", consistency="all")
            assert plain.get("j") == value
            assert zclient.get("p") == value
            assert plain.get("noise") == noise
            assert plain.get("empty") == b""
        # Every replica holds the same compressed bytes, about a tenth of the plain ones.
        held = [cluster.peer_request(i, Op.R_GET, [b"j"]) for i in range(3)]
        plain_held = cluster.peer_request(0, Op.R_GET, [b"p"])
        assert all(h[0] == held[0][0] for h in held)
        assert held[0][0][0] == MARK
        assert len(held[0][0]) * 3 < len(plain_held[0])


@pytest.mark.functional
def test_compressed_values_survive_hints(tmp_path: Path) -> None:
    value = json.loads(JSONISH)
    with running_cluster(3, tmp_path, ("--replication", "3")) as cluster:
        cluster.kill(2)
        with Client(cluster.addresses[:2], timeout=10.0) as client:
            client.set("hinted", value, consistency="quorum")
            stored = cluster.peer_request(0, Op.R_GET, [b"hinted"])[0]
        cluster.restart(2)
        assert stored[0] == MARK
        # The hint replayed the compressed bytes as they were.
        wait_for(
            lambda: (cluster.peer_request(2, Op.R_GET, [b"hinted"]) or [None])[0] == stored,
            timeout=20.0,
            what="the hint replayed",
        )
        with Client(cluster.addresses[2:], timeout=10.0, compression="off") as plain:
            assert plain.get("hinted", consistency="one") == value


@pytest.mark.functional
def test_a_client_without_the_feature_reads_values_as_written(tmp_path: Path) -> None:
    # A client of the previous version knows nothing of the 0xC1 form: its HELLO
    # lists no features. Every node then answers it the serializer's bytes, whoever
    # coordinates (GET) or holds (R_GET) the value; a peer still gets them as stored.
    value = json.loads(JSONISH)
    with running_cluster(3, tmp_path, ("--replication", "3")) as cluster:
        with Client(cluster.addresses, timeout=10.0) as zclient:
            zclient.set("j", value, consistency="all")
            zclient.set("m", b"\xc1 raw, escaped", consistency="all")
            assert zclient.compressing == Compression()
            raw = zclient.options.serializer.dumps(value)
            escaped = zclient.options.serializer.dumps(b"\xc1 raw, escaped")
        assert cluster.peer_request(0, Op.R_GET, [b"j"])[0][0] == MARK
        for node in cluster.nodes:
            old = BlockingConnection(node.data, make_hello("hypercache"), timeout=10.0)
            with old:
                assert old.peer_hello["features"] >= {FEATURE_COMPRESSION}
                assert old.request(Op.GET, [b"j", "quorum"], 10.0) == [True, raw]
                assert old.request(Op.R_GET, [b"j"], 10.0)[0] == raw
                assert old.request(Op.GET, [b"m", "one"], 10.0) == [True, escaped]
                assert old.request(Op.GET, [b"absent", "one"], 10.0) == [False, None]
        # A bomb stored by a peer: refused to the old client with a clear error, in
        # bounded memory (its declared size is over max_value), and to a new one.
        big = 64 * 1024 * 1024
        bomb = b"\xc1\x01" + struct.pack(">I", big) + _bomb(big)
        put = [b"bomb", bomb, make_ts(wall_ms(), 0), 9, 0, False]
        for i in range(3):
            assert cluster.peer_request(i, Op.R_PUT, put) is True
        with BlockingConnection(
            cluster.nodes[0].data, make_hello("hypercache"), timeout=10.0
        ) as old:
            with pytest.raises(ValueTooLargeError, match="max_value"):
                old.request(Op.GET, [b"bomb", "one"], 10.0)
            assert old.request(Op.PING, None, 10.0) == "pong"  # the connection lives on
        with (
            Client(cluster.addresses, timeout=10.0) as zclient,
            pytest.raises(ValueTooLargeError, match="max_value"),
        ):
            zclient.get("bomb")


@pytest.mark.functional
def test_compressed_values_survive_anti_entropy_and_are_charged_as_stored(
    tmp_path: Path,
) -> None:
    # A compressed value one owner alone holds (the others missed it) reaches the
    # other two by anti-entropy as the same bytes; each store charges the
    # compressed size, not the value's.
    value = json.loads(JSONISH)
    args = ("--replication", "3", "--anti-entropy-interval", "0.5")
    with running_cluster(3, tmp_path, args) as cluster:
        before = [int(n.http_json("/stats")["store"]["bytes"]) for n in cluster.nodes]
        with Client(cluster.addresses, timeout=10.0) as zclient:
            stored = ValueCodec(Compression(), MAX).encode(zclient.options.serializer.dumps(value))
        assert stored[0] == MARK and len(stored) * 3 < len(JSONISH)
        entry = [b"synced", stored, make_ts(wall_ms(), 0), 9, 0, False]
        assert cluster.peer_request(0, Op.R_PUT, entry) is True

        def synced(i: int) -> bool:
            held = cluster.peer_request(i, Op.R_GET, [b"synced"])
            return held is not None and held[0] == stored

        for i in (1, 2):
            wait_for(functools.partial(synced, i), timeout=30.0, what=f"node {i} synced")
        grown = [
            int(n.http_json("/stats")["store"]["bytes"]) - b
            for n, b in zip(cluster.nodes, before, strict=True)
        ]
        assert all(len(stored) <= g < len(stored) + 512 for g in grown), grown
        with Client(cluster.addresses[1:], timeout=10.0, compression="off") as plain:
            assert plain.get("synced", consistency="all") == value


def test_the_client_cli_sets_compression() -> None:
    from hypercache.cli.client import _compression, build_parser

    def of(*argv: str) -> Compression | None:
        return _compression(build_parser().parse_args([*argv, "get", "k"]))

    assert of() == Compression()
    assert of("--raw") is None
    assert of("--compression-min", "-1") is None
    assert of("--compression-min", "4096") == Compression(min_size=4096)
    assert of("--raw", "--compression-min", "0") == Compression(min_size=0)
