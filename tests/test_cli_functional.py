"""The ``hypercache`` CLI against real node processes: what a person at a terminal
sees when the cluster is short of replicas."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from hypercache.cli.client import EXIT_ERROR
from hypercache.cli.client import main as cli

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
