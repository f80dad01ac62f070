"""docs/configuration.md lists every node setting as the code defines it, and
examples/hypercache.toml is a configuration the node accepts.

``python -m hypercache.cli.configref`` regenerates the reference.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hypercache.cli import configref
from hypercache.cli.args import build_node_parser, node_config_from_argv
from hypercache.cluster.config import DistConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "hypercache.toml"
FIELDS = [f.name for f in dataclasses.fields(DistConfig)]
# "# key = value": a setting the sample shows commented out
_COMMENTED = re.compile(r"^# ?([a-z_]+) = (.+)$", re.M)


def _generated(text: str) -> str:
    return text.split(configref.BEGIN, 1)[1].split(configref.END, 1)[0].strip()


def test_docs_configuration_is_the_generated_reference() -> None:
    doc = configref.DOC.read_text(encoding="utf-8")
    assert doc.count(configref.BEGIN) == 1 and doc.count(configref.END) == 1
    expected = configref.reference_markdown()
    assert _generated(doc) == expected, (
        "docs/configuration.md differs from the code: regenerate it with "
        "`.venv/bin/python -m hypercache.cli.configref`"
    )
    assert configref.main(["--check"]) == 0


def _rows(markdown: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_setting_has_one_row_with_its_names() -> None:
    rows = _rows(configref.reference_markdown())
    assert sorted(rows) == sorted(FIELDS)
    parser = build_node_parser()
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    for name, (key, env, flag, kind, default, meaning) in rows.items():
        assert key == f"`{name}`"
        assert env == f"`HYPERCACHE_{name.upper()}`"
        assert flag == f"`{flags[name]}`"
        assert kind and default and meaning, name
        assert "[env" not in meaning, name  # the help's own suffix is split off


def test_every_default_shown_reads_back_as_the_default() -> None:
    """A default in backquotes is a TOML value: loaded it gives the field's default."""
    defaults = DistConfig()
    for name, cells in _rows(configref.reference_markdown()).items():
        shown = cells[4]
        if shown.startswith("*"):
            assert getattr(defaults, name) in (None, "", ()) or name == "node_id", name
            continue
        value = tomllib.loads(f"{name} = {shown.strip('`')}")[name]
        loaded = load_config(argv_values={name: value}, environ={}, toml_path=None)
        assert getattr(loaded, name) == getattr(defaults, name), name


def test_a_new_setting_shows_up_without_touching_the_generator() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(DistConfig):
        #: the kind of field another engineer adds next
        compaction_interval: float = 90.0
        shadow_reads: bool = False

    parser = build_node_parser()
    group = parser.add_argument_group("compaction")
    group.add_argument(
        "--compaction-interval",
        dest="compaction_interval",
        metavar="SECONDS",
        default=None,
        help="period of compaction [env HYPERCACHE_COMPACTION_INTERVAL; default: 90.0]",
    )
    markdown = configref.reference_markdown(Extended, parser)
    rows = _rows(markdown)
    assert "### Compaction" in markdown
    assert rows["compaction_interval"] == [
        "`compaction_interval`",
        "`HYPERCACHE_COMPACTION_INTERVAL`",
        "`--compaction-interval`",
        "duration",
        "`90`",
        "Period of compaction",
    ]
    # no flag yet: still listed, under its own heading, typed from its annotation
    assert f"### {configref.NO_FLAG_GROUP[:1].upper()}" in markdown
    assert rows["shadow_reads"][2:5] == ["-", "boolean", "`false`"]
    assert len(rows) == len(FIELDS) + 2


def test_rewrite_keeps_the_hand_written_text_and_check_reports_staleness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(f"# intro\n\n{configref.BEGIN}\nold table\n{configref.END}\n\noutro\n")
    assert configref.main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert configref.main([str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("# intro\n\n") and text.endswith("\n\noutro\n")
    assert "old table" not in text and _generated(text) == configref.reference_markdown()
    assert configref.main(["--check", str(stale)]) == 0
    with pytest.raises(ValueError, match="markers"):
        configref.rewrite("no markers here")


# ------------------------------------------------------------ examples/hypercache.toml


def test_the_sample_config_loads_through_the_node_loader() -> None:
    config = node_config_from_argv(["--config", str(SAMPLE)], {})
    data = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    assert data and set(data) <= set(FIELDS)
    assert config.seeds == tuple(data["seeds"])
    assert config.bind == "0.0.0.0:7400" and config.http == "10.0.0.1:7480"
    assert config.node_id == "cache-1"
    assert config.advertised == "10.0.0.1:7400"
    assert config.max_memory == 4 * 1024**3


def _unknown_commented(text: str) -> list[str]:
    return [key for key, _ in _COMMENTED.findall(text) if key not in FIELDS]


def test_the_samples_commented_settings_exist_and_validate_too(tmp_path: Path) -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    assert len(_COMMENTED.findall(text)) >= 10
    unknown = _unknown_commented(text)
    assert not unknown, f"examples/hypercache.toml shows settings that do not exist: {unknown}"
    # every one of them uncommented at once is still a valid configuration
    enabled = _COMMENTED.sub(r"\1 = \2", text)
    path = tmp_path / "all.toml"
    path.write_text(enabled, encoding="utf-8")
    config = node_config_from_argv(["--config", str(path)], {})
    values: dict[str, Any] = tomllib.loads(enabled)
    assert set(values) > set(tomllib.loads(text))
    assert config.cluster_secret is not None and config.dead_removal_timeout == 1800.0


def test_the_sample_checks_catch_a_misspelt_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    assert _unknown_commented(text.replace("# hint_ttl =", "# hint_tll =")) == ["hint_tll"]
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("\nreplication =", "\nreplicaton ="), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        node_config_from_argv(["--config", str(bad)], {})
    assert exc.value.code == 2
    assert "replicaton: unknown key" in capsys.readouterr().err
