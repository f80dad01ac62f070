"""The command-line programs as a person at a terminal meets them: ``hypercache``
against real node processes when the cluster is short of replicas, and
``hypercache-node`` when it cannot start."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from hypercache.cli.client import EXIT_DEGRADED, EXIT_ERROR, EXIT_MISS, EXIT_OK, EXIT_USAGE
from hypercache.cli.client import main as cli
from hypercache.client import Client
from hypercache.cluster.local import NODE_COMMAND

pytestmark = pytest.mark.functional


def test_a_quorum_error_names_its_level_and_says_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_cluster(3, tmp_path) as cluster:
        seeds = ",".join(node.data for node in cluster)
        cluster.kill(2)
        cluster.wait_healthy(up=2)

        assert cli(["--seeds", seeds, "--consistency", "all", "set", "k", "v"]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert re.fullmatch(
            r"hypercache: error: ALL not reached: 2 of 3 required replicas answered, "
            r"of 3 owners \(node-3: [^()]+\)\n",
            err,
        ), err

        cluster.kill(1)
        cluster.wait_healthy(up=1)
        assert cli(["--seeds", seeds, "--consistency", "quorum", "get", "k"]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith("hypercache: error: QUORUM not reached: 1 of 2 required"), err
        assert err.count("not reached") == 1
        for node in (cluster[1], cluster[2]):  # each owner named once, with its reason
            assert err.count(node.data) == 1, err


@pytest.mark.parametrize("flag", ["--bind", "--http"])
def test_a_port_in_use_names_the_flag_that_asked_for_it(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        flags = {"--bind": "127.0.0.1:0", "--http": "127.0.0.1:0", flag: address}
        proc = subprocess.run(
            [*NODE_COMMAND, *(a for kv in flags.items() for a in kv), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"hypercache-node: error: cannot listen on {address} ({flag[2:]}): address already "
        f"in use (is another node running there?); choose another with {flag}\n"
    )


def test_the_client_pointed_at_the_http_port_is_told_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_cluster(1, tmp_path) as cluster:
        assert cli(["--seeds", cluster[0].http, "get", "k"]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "answered in HTTP" in err and "connect to its data port (--bind)" in err, err
        assert "1213486160" not in err


# ------------------------------------------------- issue 14: real values, new commands

#: The installed ``hypercache`` script, run as a person runs it.
CLI = Path(sys.executable).parent / "hypercache"


def run_cli(
    seeds: str, *args: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(CLI), "--seeds", seeds, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def test_real_values_round_trip_and_the_new_commands(tmp_path: Path) -> None:
    blob = os.urandom(266 * 1024)  # over the shell's argument limit, not UTF-8
    (tmp_path / "blob").write_bytes(blob)
    text = "line one\nligne deux: é\n" * 5000  # 120 KiB of UTF-8 text
    (tmp_path / "text").write_text(text)
    with running_cluster(3, tmp_path) as cluster:
        seeds = ",".join(node.data for node in cluster)

        def ok(*args: str, stdin: bytes | None = None) -> bytes:
            proc = run_cli(seeds, *args, stdin=stdin)
            assert proc.returncode == 0, (args, proc.stderr.decode())
            return proc.stdout

        # 266 KB through @FILE and through standard input, byte for byte
        assert ok("--raw", "set", "blob:file", f"@{tmp_path / 'blob'}") == b"OK\n"
        assert ok("--raw", "set", "blob:stdin", "-", stdin=blob) == b"OK\n"
        assert ok("--raw", "get", "blob:file") == blob
        assert ok("--raw", "get", "blob:stdin", "--consistency", "all") == blob
        # text: stored as a string (what Client.get returns), printed as before
        ok("set", "text", f"@{tmp_path / 'text'}")
        ok("set", "piped", "-", stdin=text.encode())
        assert ok("get", "text") == ok("get", "piped") == text.encode() + b"\n"
        with Client(seeds) as client:
            assert client.get("text") == text

        set_at = time.monotonic()
        ok("mset", "user:1", "Ada", "user:2", "Grace", "order:1", "@@home", "--ttl", "60")
        assert ok("mget", "user:1", "order:1") == b"user:1\tAda\norder:1\t@home\n"
        proc = run_cli(seeds, "mget", "user:1", "user:9")
        assert proc.returncode == EXIT_MISS and b"'user:9' not found" in proc.stderr
        # the remaining TTL has shrunk by at most the time since the write (CLI
        # start-up on a loaded machine takes a good part of a second)
        remaining = float(ok("ttl", "user:1"))  # (read before the time elapsed)
        assert 60 - (time.monotonic() - set_at) - 0.1 < remaining <= 60
        assert ok("ttl", "text") == b"none\n"
        expired_at = time.monotonic()
        assert ok("expire", "text", "120") == b"OK\n"
        remaining = float(ok("ttl", "text", "--consistency", "all"))
        assert 120 - (time.monotonic() - expired_at) - 0.1 < remaining <= 120
        assert ok("expire", "text", "none") == b"OK\n"
        assert ok("ttl", "text") == b"none\n"
        assert run_cli(seeds, "ttl", "nothing").returncode == EXIT_MISS
        assert run_cli(seeds, "expire", "nothing", "5").returncode == EXIT_MISS

        everything = [b"blob:file", b"blob:stdin", b"order:1", b"piped", b"text"]
        assert ok("keys").splitlines() == sorted([*everything, b"user:1", b"user:2"])
        assert ok("keys", "user:*").splitlines() == [b"user:1", b"user:2"]
        assert ok("scan", "blob:?i*", "--node", cluster[1].data).splitlines() == [b"blob:file"]
        assert len(ok("keys", "--limit", "3").splitlines()) == 3
        proc = run_cli(seeds, "keys", "--node", "127.0.0.1:1")
        assert proc.returncode == EXIT_USAGE and b"not a node of the cluster" in proc.stderr

        out = ok("bench", "--requests", "200", "--concurrency", "4", "--keys", "20")
        lines = out.decode().splitlines()
        assert lines[0].startswith("bench: 200 requests per op")
        assert [line.split()[:3] for line in lines[2:4]] == [
            ["set", "200", "0"],
            ["get", "200", "0"],
        ]

        # flush: refused without the cluster's name, done with it
        proc = run_cli(seeds, "flush", stdin=b"no\n")
        assert proc.returncode == EXIT_MISS and b"nothing was dropped" in proc.stderr
        assert ok("get", "user:1") == b"Ada\n"
        out = ok("flush", stdin=b"hypercache\n")
        # 27 keys (7 above and bench's 20), on each of the 3 nodes (replication 3)
        assert out.count(b"dropped 27") == 3 and out.endswith(b"81 entries dropped on 3 nodes\n")
        assert ok("keys") == b""
        assert run_cli(seeds, "get", "user:1").returncode == EXIT_MISS


def test_health_and_ping_strict_with_one_node_of_three_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_cluster(3, tmp_path) as cluster:
        seeds = ",".join(node.data for node in cluster)
        assert cli(["--seeds", seeds, "health", "--strict"]) == EXIT_OK
        assert capsys.readouterr().out.startswith("status: ok\nnodes: 3 of 3 reachable\n")
        assert cli(["--seeds", seeds, "ping", "--strict"]) == EXIT_OK
        capsys.readouterr()

        cluster.kill(2)
        cluster.wait_healthy(up=2)
        assert cli(["--seeds", seeds, "ping"]) == EXIT_OK  # two nodes answer
        assert cli(["--seeds", seeds, "ping", "--strict"]) == EXIT_DEGRADED
        err = capsys.readouterr().err
        assert "status: degraded" in err and f"unreachable: node-3 at {cluster[2].data}" in err
        assert cli(["--seeds", seeds, "health"]) == EXIT_OK
        out = capsys.readouterr().out
        assert out.startswith("status: degraded\nnodes: 2 of 3 reachable\n"), out
        # replication 3 on 3 nodes: every partition has node-3 as an owner
        assert "have fewer than 3 reachable owners" in out and "unreachable: node-3" in out
        assert cli(["--seeds", seeds, "health", "--strict"]) == EXIT_DEGRADED
        assert cli(["--seeds", seeds, "members"]) == EXIT_OK
        out = capsys.readouterr().out
        assert out.count(" yes ") == 2 and out.count(" no ") == 1

        # flush with a node down: the others are flushed, the command says what it means
        assert cli(["--seeds", seeds, "set", "k", "v", "--consistency", "quorum"]) == EXIT_OK
        assert cli(["--seeds", seeds, "flush", "--yes"]) == EXIT_ERROR
        captured = capsys.readouterr()
        assert f"{cluster[2].data}  NOT FLUSHED" in captured.out
        assert "anti-entropy will copy them back" in captured.err

        cluster.kill(1)
        cluster.kill(0)
        assert cli(["--seeds", seeds, "--timeout", "1", "health"]) == EXIT_ERROR
        assert capsys.readouterr().out.startswith("status: down\n")
