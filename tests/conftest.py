"""Fixtures shared by the transport tests (see net_helpers.py for their helpers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from net_helpers import LOOPS, Runner

from hypercache.net import TCP, InprocNetwork, Transport


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Runner[Any]]:
    """Run a coroutine on a fresh loop of each kind; the loop lives for the test."""
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield runner.run


@pytest.fixture(params=["tcp", "inproc"])
def transport(request: pytest.FixtureRequest) -> Transport:
    return TCP if request.param == "tcp" else InprocNetwork()
