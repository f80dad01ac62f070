"""The command-line programs as a person at a terminal meets them: ``hypercache``
against real node processes when the cluster is short of replicas, and
``hypercache-node`` when it cannot start."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from hypercache.cli.client import EXIT_ERROR
from hypercache.cli.client import main as cli
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
