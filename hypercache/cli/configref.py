"""The configuration reference of ``hypercache-node``, generated from the code.

:func:`reference_markdown` renders one table per argument group of
:func:`~hypercache.cli.args.build_node_parser`: every
:class:`~hypercache.cluster.config.DistConfig` field with its TOML key, its
``HYPERCACHE_*`` environment variable, its flag, its type, its default and the
flag's one-line help. Nothing is listed by hand: a field added to
:class:`~hypercache.cluster.config.DistConfig` (and its flag to the parser) shows up
in the next generation, and ``tests/test_configref.py`` fails until
``docs/configuration.md`` is regenerated::

    python -m hypercache.cli.configref            # rewrite docs/configuration.md
    python -m hypercache.cli.configref --check    # exit 1 when it is out of date

The reference lives between the markers :data:`BEGIN` and :data:`END`; the text
around them is written by hand and kept.

It sits in :mod:`hypercache.cli` rather than next to the dataclass because it reads
both the dataclass and the argument parser, and the parser is the CLI's.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from hypercache.cli.args import build_node_parser
from hypercache.cluster.config import DistConfig, env_var_name
from hypercache.consistency import Consistency
from hypercache.units import GiB, KiB, MiB

__all__ = ["BEGIN", "DOC", "END", "Setting", "reference_markdown", "rewrite", "settings"]

#: The markers around the generated part of ``docs/configuration.md``.
BEGIN: Final = "<!-- config:begin -->"
END: Final = "<!-- config:end -->"

#: ``docs/configuration.md`` of the source checkout this module was imported from.
DOC: Final = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

#: The group of a field that has no flag (it can still be set by TOML and env).
NO_FLAG_GROUP: Final = "settings without a flag"

# What a flag's metavar says about the value it takes.
_KINDS: Final = {
    "BYTES": "size",
    "SECONDS": "duration",
    "N": "integer",
    "true|false": "boolean",
    "HOST:PORT": "address",
    "one|quorum|all": "`one`, `quorum`, `all`",
}
# The same from the field's annotation, for a field without a flag.
_ANNOTATIONS: Final = {
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "str": "string",
    "Consistency": "`one`, `quorum`, `all`",
    "tuple[str, ...]": "list of addresses",
}
_HELP_SUFFIX: Final = re.compile(r"\s*\[env [A-Z0-9_]+; default: (?P<default>.*)\]$", re.S)
_IVAR: Final = re.compile(r":ivar (\w+): (.*?)(?=\n\s*:ivar |\n\s*\n|\Z)", re.S)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Setting:
    """One row of the reference."""

    key: str
    env: str
    flag: str | None
    group: str
    kind: str
    default: str
    description: str


def _toml_value(value: Any, kind: str) -> str:
    """``value`` written as it would be in the TOML file (and read back the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Consistency):
        return f'"{value.value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{item}"' for item in value) + "]"
    if kind == "size" and isinstance(value, int) and value:
        for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
            if value % unit == 0:
                return f'"{value // unit}{name}"'
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _ivars(cls: type[Any]) -> dict[str, str]:
    """``{field: first sentence}`` of the ``:ivar:`` lines of ``cls``'s docstring."""
    found: dict[str, str] = {}
    for name, text in _IVAR.findall(cls.__doc__ or ""):
        sentence = " ".join(text.split()).split(". ")[0].rstrip(".")
        found[name] = sentence
    return found


def settings(
    config_cls: type[Any] = DistConfig, parser: argparse.ArgumentParser | None = None
) -> list[Setting]:
    """Every field of ``config_cls`` as a :class:`Setting`, in the parser's order
    (its groups, then its arguments), fields without a flag last."""
    parser = parser if parser is not None else build_node_parser()
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    ivars = _ivars(config_cls)
    rows: list[Setting] = []
    seen: set[str] = set()
    for group in parser._action_groups:
        for action in group._group_actions:
            field = fields.get(action.dest)
            if field is None or action.dest in seen:
                continue
            seen.add(action.dest)
            rows.append(_setting(field, action, str(group.title), ivars))
    for name, field in fields.items():
        if name not in seen:
            rows.append(_setting(field, None, NO_FLAG_GROUP, ivars))
    return rows


def _setting(
    field: dataclasses.Field[Any],
    action: argparse.Action | None,
    group: str,
    ivars: dict[str, str],
) -> Setting:
    annotation = str(field.type)
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    metavar = str(action.metavar) if action is not None else ""
    if metavar.startswith("HOST:PORT[,"):
        kind = "list of addresses"
    else:
        kind = _KINDS.get(metavar) or _ANNOTATIONS.get(base, "string")
    help_text = (action.help or "") if action is not None else ""
    match = _HELP_SUFFIX.search(help_text)
    described_default = match["default"] if match else None
    description = help_text[: match.start()] if match else help_text
    if not description:
        description = ivars.get(field.name, "")
    default: Any = field.default
    factory: Any = field.default_factory
    if default is dataclasses.MISSING and factory is not dataclasses.MISSING:
        default = factory()
    if default is None or default == "":
        # "not set" means something different for each field: the flag's help says what
        shown = f"*{described_default or 'none'}*"
    else:
        shown = f"`{_toml_value(default, kind)}`"
    return Setting(
        key=field.name,
        env=env_var_name(field.name),
        flag=action.option_strings[0] if action is not None and action.option_strings else None,
        group=group,
        kind=f"{kind} or off" if optional and kind == "duration" else kind,
        default=shown,
        description=description[:1].upper() + description[1:],
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown(
    config_cls: type[Any] = DistConfig, parser: argparse.ArgumentParser | None = None
) -> str:
    """The generated part of ``docs/configuration.md``: a table per group."""
    rows = settings(config_cls, parser)
    out: list[str] = []
    groups: list[str] = []
    for row in rows:
        if row.group not in groups:
            groups.append(row.group)
    for group in groups:
        out += [
            f"### {group[:1].upper()}{group[1:]}",
            "",
            "| TOML key | environment | flag | type | default | meaning |",
            "|:--|:--|:--|:--|:--|:--|",
        ]
        for row in rows:
            if row.group != group:
                continue
            flag = f"`{row.flag}`" if row.flag else "-"
            out.append(
                f"| `{row.key}` | `{row.env}` | {flag} | {_cell(row.kind)} | "
                f"{_cell(row.default)} | {_cell(row.description)} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n")


def rewrite(text: str, reference: str | None = None) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = reference_markdown() if reference is None else reference
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hypercache.cli.configref [--check] [PATH]``."""
    parser = argparse.ArgumentParser(
        prog="python -m hypercache.cli.configref",
        description="Regenerate the configuration reference between its markers.",
    )
    parser.add_argument("path", nargs="?", type=Path, default=DOC, help=f"default: {DOC}")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 when the file is stale"
    )
    args = parser.parse_args(argv)
    path: Path = args.path
    old = path.read_text(encoding="utf-8")
    new = rewrite(old)
    if args.check:
        if new != old:
            print(f"{path} is out of date: run python -m hypercache.cli.configref", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new, encoding="utf-8")
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
