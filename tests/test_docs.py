"""The README's and the docs' code blocks run as written.

Every fenced block carries a language: ``text`` blocks are formats and are not run;
``toml`` blocks are node configurations, read by the node's own loader; ``python``
blocks run in a fresh interpreter against a local cluster started the way ``make
run`` starts it; ``sh`` blocks run line by line. A python line that ends in a
comment starting with a literal (``cache.get("k")   # {'name': 'Ada'}``) asserts that
value; an sh line ending in ``# prints TEXT`` asserts TEXT in its output.

The only liberty taken with the text is the ports: the examples name ``make run``'s
fixed ports (data 7400-7403, HTTP 7480-7483), which this machine may have in use, so
each is mapped to a free one; the by-hand ``hypercache-node`` blocks get every
address mapped to a free loopback port, so the multi-machine example runs here too
(a node that binds a wildcard address, ``--bind 0.0.0.0:7400``, listens at its
``--advertise`` address instead: one wildcard port per machine is one port per
node here), and with 256 partitions, to be ready in a second. Such a block may set
the nodes' environment first with ``export NAME=VALUE`` lines.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_harness import FAST_FLAGS, free_port_run

from hypercache.cli.args import node_config_from_argv
from hypercache.cluster.local import ProcessCluster, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "sh", "text", "toml"}
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(language: str | None = None) -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            block = Block(path, line, match.group(1), match.group(2))
            if language is None or block.language == language:
                found.append(block)
    return found


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class MakeRunPorts:
    """``make run``'s ports (7400-7403 data, 7480-7483 HTTP) mapped to a free run of
    eight: 7400+i to ``base``+i, 7480+i to ``base``+4+i."""

    PATTERN = re.compile(r"(?<=:)74([08])([0-3])\b")

    def __init__(self) -> None:
        self.base = free_port_run(8)

    def port(self, fixed: int) -> int:
        return self.base + (fixed - 7400 if fixed < 7480 else 4 + fixed - 7480)

    def __call__(self, text: str) -> str:
        return self.PATTERN.sub(lambda m: str(self.port(int(m.group(0)))), text)


# --- toml blocks -------------------------------------------------------------------


@pytest.mark.parametrize("block", _blocks("toml"), ids=lambda b: b.name)
def test_toml_block_is_a_configuration_the_node_accepts(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(block.code, encoding="utf-8")
    config = node_config_from_argv(["--config", str(path)], {})
    assert config.to_dict()


# --- python blocks -----------------------------------------------------------------

_COMMENTED = re.compile(r"^(?P<indent>\s*)(?P<code>\S.*?)\s{2,}# (?P<comment>.+)$")


def _literal_prefix(comment: str) -> str | None:
    """The longest prefix of ``comment`` (whole, or up to a ``:``) that is a literal."""
    cuts = [len(comment)] + [i for i in range(len(comment) - 1, 0, -1) if comment[i] == ":"]
    for cut in cuts:
        candidate = comment[:cut].strip()
        try:
            ast.literal_eval(candidate)
        except (ValueError, SyntaxError):
            continue
        return candidate
    return None


def _is_expression(code: str) -> bool:
    try:
        tree = ast.parse(code.strip())
    except SyntaxError:
        # an ``await`` outside a function does not parse on its own
        try:
            tree = ast.parse(f"async def _():\n    {code.strip()}")
        except SyntaxError:
            return False
        return isinstance(tree.body[0], ast.AsyncFunctionDef) and isinstance(
            tree.body[0].body[0], ast.Expr
        )
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr)


def with_asserts(code: str) -> tuple[str, int]:
    """``code`` with every ``expression  # literal`` line turned into an assertion."""
    out, count = [], 0
    for line in code.splitlines():
        match = _COMMENTED.match(line)
        if match and _is_expression(match["code"]):
            expected = _literal_prefix(match["comment"])
            if expected is not None:
                indent, expr = match["indent"], match["code"]
                message = f"{expr} should be {expected}, is "
                line = (
                    f"{indent}_seen = ({expr}); "
                    f"assert _seen == ({expected}), {message!r} + repr(_seen)"
                )
                count += 1
        out.append(line)
    return "\n".join(out) + "\n", count


def test_the_assertion_rewrite_asserts_literal_comments_only() -> None:
    code, count = with_asserts(
        "x = {'a': 1}\n"
        "x['a']            # 1: the value\n"
        "x                 # {'a': 1}\n"
        "len(x)            # entries held\n"
        "    await f(x)    # [1, 2]\n"
    )
    assert count == 3
    lines = code.splitlines()
    assert lines[1].startswith("_seen = (x['a']); assert _seen == (1)")
    assert lines[3] == "len(x)            # entries held"
    assert lines[4].startswith("    _seen = (await f(x)); assert _seen == ([1, 2])")
    exec("\n".join(lines[:3]), {})
    with pytest.raises(AssertionError, match="y should be '2', is 2"):
        exec(with_asserts("y = 2\ny   # '2'\n")[0], {})


def test_the_port_map_moves_make_runs_ports_only() -> None:
    ports = MakeRunPorts()
    b = ports.base
    assert ports("127.0.0.1:7400 :7402 127.0.0.1:7483/metrics") == (
        f"127.0.0.1:{b} :{b + 2} 127.0.0.1:{b + 7}/metrics"
    )
    assert ports("127.0.0.1:7404 10.0.0.1:17400 port 7400") == (
        "127.0.0.1:7404 10.0.0.1:17400 port 7400"
    )


def test_every_fenced_block_names_a_language_this_test_knows() -> None:
    unknown = [b.name for b in _blocks() if b.language not in LANGUAGES]
    assert not unknown, f"blocks without a known language ({LANGUAGES}): {unknown}"
    assert len(_blocks("python")) >= 4
    assert len(_blocks("sh")) >= 6


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRunPorts]:
    """A 3-node cluster as ``make run`` starts it, at the mapped ports."""
    ports = MakeRunPorts()
    workdir = tmp_path_factory.mktemp("make-run")
    with ProcessCluster(3, workdir, FAST_FLAGS, ports=(ports.port(7400), ports.port(7480))):
        yield ports


def _run_python(block: Block, ports: MakeRunPorts, tmp_path: Path) -> int:
    code, asserts = with_asserts(ports(block.code))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{block.name} failed:\n{code}\n{proc.stderr}"
    return asserts


# docs/cluster.md's block joins a fourth node to the cluster: run it last.
_PYTHON = sorted(_blocks("python"), key=lambda b: "Node(" in b.code)


@pytest.mark.functional
@pytest.mark.parametrize("block", _PYTHON, ids=lambda b: b.name)
def test_python_block_runs_as_written(block: Block, make_run: MakeRunPorts, tmp_path: Path) -> None:
    asserts = _run_python(block, make_run, tmp_path)
    # the blocks that show results show them as literal comments
    if "get(" in block.code:
        assert asserts >= 1, f"{block.name}: no result it shows was checked"


# --- sh blocks ---------------------------------------------------------------------


def _commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments kept."""
    return [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def _split_comment(command: str) -> tuple[str, str]:
    words = command.split("  #", 1) if "  #" in command else command.split(" # ", 1)
    return words[0].strip(), (words[1].strip() if len(words) > 1 else "")


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _kind(command: str) -> str:
    program = shlex.split(command)[0]
    if program == "export":
        return "env"
    if program == "make":
        return "make"
    if program == "hypercache-node":
        return "node"
    if program.endswith("python"):
        return "python"
    return "cli"


def _check_make(command: str, block: Block) -> None:
    target = shlex.split(command)[1]
    proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{block.name}: make {target}: {proc.stderr}"


def _check_python(command: str, block: Block, tmp_path: Path) -> None:
    """A benchmark or tool command: the program exists and takes every flag shown.

    (Running them would take minutes; their own tests run them.)"""
    words = shlex.split(command.split(">")[0])
    words[0] = sys.executable
    if words[1:3] == ["-m", "pytest"]:
        # a single benchmark by hand: run it (seconds with --bench-quick)
        proc = subprocess.run(
            [*words, "-q", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{block.name}: {command}\n{proc.stdout}\n{proc.stderr}"
        assert "passed" in proc.stdout
        return
    program = words[:3] if words[1] == "-m" else words[:2]
    proc = subprocess.run([*program, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{block.name}: {program} --help: {proc.stderr}"
    for flag in (w for w in words if w.startswith("--")):
        assert flag in proc.stdout, f"{block.name}: {program} has no {flag}"


def _address_map(commands: list[str]) -> dict[str, str]:
    addresses = sorted({m for c in commands for m in re.findall(r"\b[\d.]+:\d+\b", c)})
    return dict(
        zip(addresses, (f"127.0.0.1:{p}" for p in _free_ports(len(addresses))), strict=True)
    )


def _health(http: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"http://{http}/health", timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except OSError:
        return None


# Nodes that all start with seeds (the deployment example) have every partition not
# ready until each has found that nobody holds it: with 4096 partitions that took
# 10-40 s on a loaded machine (docs/deployment.md says so); with 256, about a second.
_FEW_PARTITIONS = ("--partitions", "256")

_WILDCARD_BIND = re.compile(r"--bind[ =](0\.0\.0\.0|\[::\]):\d+")


def _listen_where_advertised(command: str) -> str:
    """``command`` with a wildcard ``--bind`` replaced by its ``--advertise`` address."""
    advertise = re.search(r"--advertise[ =](\S+)", command)
    if advertise is None:
        return command
    return _WILDCARD_BIND.sub(f"--bind {advertise[1]}", command)


def test_node_blocks_listen_where_they_advertise_and_take_their_exports() -> None:
    line = "hypercache-node --bind 0.0.0.0:7400 --advertise 10.0.0.2:7400 --http 10.0.0.2:7480"
    assert _listen_where_advertised(line) == (
        "hypercache-node --bind 10.0.0.2:7400 --advertise 10.0.0.2:7400 --http 10.0.0.2:7480"
    )
    assert _listen_where_advertised("hypercache-node --bind 0.0.0.0:7400") == (
        "hypercache-node --bind 0.0.0.0:7400"
    )
    assert _kind("export HYPERCACHE_CLUSTER_SECRET=x") == "env"


def _launch_nodes(commands: list[str], block: Block, tmp_path: Path) -> None:
    """Start the block's ``hypercache-node`` lines, with the environment its
    ``export`` lines set, wait for one healthy cluster, stop."""
    exports = [shlex.split(c)[1] for c in commands if _kind(c) == "env"]
    node_env = {**_env(), **dict(e.split("=", 1) for e in exports)}
    commands = [_listen_where_advertised(c) for c in commands if _kind(c) == "node"]
    addresses = _address_map(commands)
    https = []
    procs = []
    try:
        for i, command in enumerate(commands):
            for old, new in addresses.items():
                command = re.sub(rf"(?<![\d.]){re.escape(old)}\b", new, command)
            words = shlex.split(command)
            https.append(words[words.index("--http") + 1])
            log = (tmp_path / f"node-{i}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [str(BIN / words[0]), *words[1:], *FAST_FLAGS, *_FEW_PARTITIONS],
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=node_env,
                )
            )
            log.close()

        def everyone_up() -> bool:
            for http in https:
                health = _health(http)
                if not health or health.get("status") != "ok":
                    return False
                if health.get("members_up") != len(commands):
                    return False
            return True

        wait_for(everyone_up, timeout=60, interval=0.2, what=f"{block.name}'s nodes healthy")
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)  # a stop without leaving: they all go
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_SH = _blocks("sh")


@pytest.mark.functional
@pytest.mark.parametrize("block", _SH, ids=lambda b: b.name)
def test_sh_block_runs_as_written(block: Block, make_run: MakeRunPorts, tmp_path: Path) -> None:
    commands = _commands(block.code)
    kinds = {_kind(c) for c in commands}
    if kinds == {"env", "node"}:
        kinds = {"node"}  # the nodes' environment, then the nodes
    assert len(kinds) == 1, f"{block.name}: one kind of command per block, not {kinds}"
    kind = kinds.pop()
    if kind == "node":
        _launch_nodes([_split_comment(c)[0] for c in commands], block, tmp_path)
        return
    for line in commands:
        command, comment = _split_comment(line)
        if kind == "make":
            _check_make(command, block)
        elif kind == "python":
            _check_python(command, block, tmp_path)
        else:
            proc = _shell(make_run(command), tmp_path)
            assert proc.returncode == 0, f"{block.name}: {command}\n{proc.stdout}\n{proc.stderr}"
            assert proc.stdout.strip(), f"{block.name}: {command} printed nothing"
            if comment.startswith("prints "):
                expected = comment.removeprefix("prints ")
                assert expected in proc.stdout, f"{block.name}: {command}: {proc.stdout!r}"
