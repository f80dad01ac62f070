"""The deployment files in deploy/ fit the code they deploy.

Neither systemd nor docker runs here: the unit's command line is parsed by the
node's own argument parser and loaded with the sample configuration it installs,
and the Dockerfile's instructions are read, their files looked up in the
repository, and the node's command and environment loaded the same way.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from hypercache.cli.args import build_node_parser, node_config_from_argv
from hypercache.cluster.config import DistConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "hypercache-node.service"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SAMPLE = ROOT / "examples" / "hypercache.toml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
SECRET = {"HYPERCACHE_CLUSTER_SECRET": "s" * 24}


# --- systemd -------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``{"Section.Key": [values]}`` of a unit file (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


UNIT_SETTINGS = unit_settings(UNIT.read_text())


def test_the_units_command_line_parses_with_the_nodes_parser() -> None:
    (exec_start,) = UNIT_SETTINGS["Service.ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert Path(program).name == "hypercache-node" and "hypercache-node" in SCRIPTS
    namespace = build_node_parser().parse_args(argv)  # exits on an unknown flag
    assert namespace.config == "/etc/hypercache/hypercache.toml"


def test_the_unit_runs_the_sample_it_installs_with_the_secret_from_its_env_file() -> None:
    text = UNIT.read_text()
    # the install steps put examples/hypercache.toml where ExecStart reads it
    assert "examples/hypercache.toml /etc/hypercache/hypercache.toml" in text
    (env_file,) = UNIT_SETTINGS["Service.EnvironmentFile"]
    assert env_file.lstrip("-") in SAMPLE.read_text()  # the sample points the secret there
    assert "HYPERCACHE_CLUSTER_SECRET=" in text
    (exec_start,) = UNIT_SETTINGS["Service.ExecStart"]
    argv = [str(SAMPLE) if w.endswith("hypercache.toml") else w for w in shlex.split(exec_start)]
    config = node_config_from_argv(argv[1:], SECRET)
    assert config.cluster_secret == SECRET["HYPERCACHE_CLUSTER_SECRET"]
    assert config.leave_on_stop


def test_the_unit_waits_for_a_graceful_leave_and_does_not_loop_on_bad_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (stop,) = UNIT_SETTINGS["Service.TimeoutStopSec"]
    config = node_config_from_argv(["--config", str(SAMPLE)], SECRET)
    assert float(stop) > config.leave_timeout + config.request_timeout
    assert UNIT_SETTINGS["Service.KillSignal"] == ["SIGTERM"]
    (no_restart,) = UNIT_SETTINGS["Service.RestartPreventExitStatus"]
    with pytest.raises(SystemExit) as exc:
        node_config_from_argv(["--replication", "0"], {})
    assert exc.value.code == int(no_restart)
    assert "replication" in capsys.readouterr().err
    (files,) = UNIT_SETTINGS["Service.LimitNOFILE"]
    assert int(files) > DistConfig().max_connections


# --- Dockerfile ----------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of each instruction, continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


STEPS = instructions(DOCKERFILE.read_text())
IGNORED = [
    line.strip()
    for line in (ROOT / ".dockerignore").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def _ignored(path: str) -> bool:
    return any(
        fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
        for pattern in IGNORED
    )


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for step in STEPS:
        if step[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(step)
    return stages


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _exec_form(stage: list[tuple[str, str]], word: str) -> list[str]:
    found = [rest for w, rest in stage if w == word]
    assert found, f"no {word}"
    value = json.loads(found[-1])
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_the_dockerfile_builds_in_one_stage_and_runs_in_another() -> None:
    builder, runtime = _stages()
    name = builder[0][1].split(" AS ")[-1].strip()
    assert name == "builder" and " AS " not in runtime[0][1]
    build_runs = " ".join(rest for word, rest in builder if word == "RUN")
    assert "gcc" in build_runs and "pip install --no-cache-dir ." in build_runs
    assert not [rest for word, rest in runtime if word == "RUN" and "gcc" in rest]
    copied = [rest for word, rest in runtime if word == "COPY"]
    assert copied == [f"--from={name} /opt/hypercache /opt/hypercache"]
    assert "/opt/hypercache/bin" in _env(runtime)["PATH"]


def test_the_dockerfiles_copies_name_files_that_exist_and_reach_the_build() -> None:
    sources = []
    for word, rest in STEPS:
        if word in {"COPY", "ADD"} and not rest.startswith("--from"):
            *srcs, _dest = shlex.split(rest)
            sources += srcs
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"deploy/Dockerfile copies {src}, which does not exist"
        assert not _ignored(src), f"{src} is excluded by .dockerignore"
    # what `pip install .` reads: the build script, the readme, the licence files
    needed = ["pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]]
    needed += PYPROJECT["project"]["license-files"]
    assert set(needed) <= set(sources)
    assert "hypercache" in sources
    sources_in_package = [
        p.relative_to(ROOT).as_posix() for p in (ROOT / "hypercache").rglob("*.py*")
    ]
    assert sources_in_package and not [p for p in sources_in_package if _ignored(p)]


def test_the_dockerignore_keeps_in_place_builds_out_of_the_image() -> None:
    for built in (
        "hypercache/_core/ring.cpython-311-x86_64-linux-gnu.so",
        "hypercache/_core/ring.c",
    ):
        assert _ignored(built)
    assert _ignored(".venv") and not _ignored("hypercache/_core/ring.pyx")


def test_the_images_command_and_environment_load_as_a_node_configuration() -> None:
    runtime = _stages()[-1]
    entrypoint = _exec_form(runtime, "ENTRYPOINT")
    assert entrypoint[0] in SCRIPTS and entrypoint[0] == "hypercache-node"
    argv = entrypoint[1:] + _exec_form(runtime, "CMD")
    environ = {k: v for k, v in _env(runtime).items() if k.startswith("HYPERCACHE_")}
    config = load_config(
        argv_values={
            k: v for k, v in vars(build_node_parser().parse_args(argv)).items() if k != "config"
        },
        environ=environ,
        toml_path=None,
    )
    assert config.bind == "0.0.0.0:7400" and config.http == "0.0.0.0:7480"
    assert config.http_address is not None
    http_port = config.http_address[1]
    exposed = {int(p) for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    assert exposed == {config.address[1], http_port}
    (health,) = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert f"127.0.0.1:{http_port}/health" in health
    assert ("STOPSIGNAL", "SIGTERM") in runtime
