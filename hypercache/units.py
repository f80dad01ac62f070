"""Units and addresses as people write them: sizes, durations, ``HOST:PORT``, seed lists.

One parser of each, used by the node's configuration, the clients and the wire
layer alike, each raising :class:`~hypercache.errors.ConfigError` that names the
field being parsed.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Final

from hypercache.errors import ConfigError

__all__ = [
    "GiB",
    "KiB",
    "MiB",
    "check_int",
    "check_seconds",
    "describe",
    "format_hostport",
    "parse_duration",
    "parse_hostport",
    "parse_seeds",
    "parse_size",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_SIZE = re.compile(r"([0-9]+(?:_[0-9]+)*(?:\.[0-9]+)?)\s*([A-Za-z]*)")
_DURATION = re.compile(
    r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(us|\u00b5s|\u03bcs|ms|s|m|h|d)?", re.IGNORECASE
)

_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# unit -> (multiplier, divisor): dividing keeps "20us" == 20e-6 exactly.
_DURATION_UNITS: Final = {
    "us": (1, 1_000_000),
    "\u00b5s": (1, 1_000_000),  # micro sign
    "\u03bcs": (1, 1_000_000),  # Greek mu (what the micro sign matches without case)
    "ms": (1, 1000),
    "s": (1, 1),
    "m": (60, 1),
    "h": (3600, 1),
    "d": (86400, 1),
}


# --------------------------------------------------------------------------- addresses


def parse_hostport(s: str, *, field: str = "address") -> tuple[str, int]:
    """Split ``"HOST:PORT"`` into ``(host, port)``.

    ``HOST`` is an IPv4 address, a host name (RFC 1123 labels; ``_`` is tolerated
    for container service names) or an IPv6 address in brackets, returned without
    them: ``parse_hostport("[::1]:7400") == ("::1", 7400)``. ``PORT`` is 0..65535.
    Surrounding blanks are ignored.

    :param field: the configuration field to name in the error.
    :raises ConfigError: ``s`` is not a valid ``HOST:PORT``.
    """
    if not isinstance(s, str):
        raise ConfigError(field, f"expected HOST:PORT as a string, got {s!r}")
    text = s.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(field, f"unclosed '[' in {s!r}; expected [IPv6]:PORT")
        if not rest.startswith(":"):
            raise ConfigError(field, f"expected [IPv6]:PORT, got {s!r} (missing :PORT)")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(field, f"invalid IPv6 address {host!r} in {s!r}") from None
    else:
        if ":" not in text:
            raise ConfigError(field, f"expected HOST:PORT, got {s!r} (missing :PORT)")
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ConfigError(
                field, f"IPv6 addresses must be written in brackets, e.g. [::1]:7400; got {s!r}"
            )
        _check_host(field, host, s)
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ConfigError(field, f"expected a port number 0..65535, got {port_text!r} in {s!r}")
    return host, int(port_text)


def _check_host(field: str, host: str, whole: str) -> None:
    if not host:
        raise ConfigError(field, f"missing host in {whole!r}; expected HOST:PORT")
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        # Digits and dots only: this can only be meant as an IPv4 address.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(field, f"invalid IPv4 address {host!r} in {whole!r}") from None
        return
    if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(field, f"invalid host name {host!r} in {whole!r}")


def format_hostport(host: str, port: int) -> str:
    """Inverse of :func:`parse_hostport`: brackets an IPv6 host (``"[::1]:7400"``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_seeds(value: Any, *, field: str = "seeds", required: bool = False) -> tuple[str, ...]:
    """The seed addresses of ``"h:p,h:p"`` or of a sequence of ``"h:p"``: each parsed
    by :func:`parse_hostport` and written back normalised, duplicates dropped, in
    order. A seed needs a real port (not 0).

    :param required: refuse an empty list.
    :raises ConfigError: a malformed address, or none when ``required``.
    """
    if isinstance(value, str):
        items: Iterable[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise ConfigError(field, f"expected a list of HOST:PORT, got {value!r}")
    seeds: dict[str, None] = {}  # ordered set
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(field, f"addresses must be strings, got {item!r}")
        if not item.strip():
            continue
        host, port = parse_hostport(item, field=field)
        if port == 0:
            raise ConfigError(field, f"seed {item!r} has port 0; a seed needs a real port")
        seeds[format_hostport(host, port)] = None
    if required and not seeds:
        raise ConfigError(field, "at least one 'host:port' is required")
    return tuple(seeds)


# --------------------------------------------------------------------- text values


def parse_size(text: str, *, field: str = "size") -> int:
    """Parse a byte count: ``"1048576"``, ``"64MiB"``, ``"1GB"``, ``"1.5 GiB"``.

    Units (case-insensitive): ``B``; ``KB MB GB TB`` = powers of 1000;
    ``KiB MiB GiB TiB`` = powers of 1024. The result must be a whole number of bytes.

    :raises ConfigError: the text is not a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            field, f"expected a size in bytes (e.g. 1048576, 64MiB, 1GB), got {text!r}"
        )
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        if unit.lower() in {"k", "m", "g", "t"}:
            letter = unit.upper()
            raise ConfigError(
                field,
                f"ambiguous unit {unit!r} in {text!r}: write {letter}B (powers of 1000) "
                f"or {letter}iB (powers of 1024)",
            )
        raise ConfigError(
            field, f"unknown size unit {unit!r} in {text!r}; use B, KB, MB, GB, KiB, MiB, GiB"
        )
    try:
        value = Fraction(Decimal(number.replace("_", ""))) * multiplier
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ConfigError(field, f"expected a size in bytes, got {text!r}") from None
    if value.denominator != 1:
        raise ConfigError(field, f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str, *, field: str = "duration") -> float:
    """Parse a duration in seconds: ``"2.5"``, ``"50us"``, ``"500ms"``, ``"30s"``, ``"5m"``,
    ``"1h"``, ``"1d"``.

    :raises ConfigError: the text is not a duration.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            field,
            "expected a duration in seconds (e.g. 2.5, 50us, 500ms, 30s, 5m, 1h, 1d), "
            f"got {text!r}",
        )
    number, unit = match.groups()
    multiplier, divisor = _DURATION_UNITS[(unit or "s").lower()]
    return float(number) * multiplier / divisor


# --------------------------------------------------------------------- value checks


def describe(value: Any) -> str:
    """``repr`` and type of a value, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def check_int(field: str, value: Any, *, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``low..high``.

    :raises ConfigError: naming ``field``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {describe(value)}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(field, f"must be {bound}, got {value}")
    return value


def check_seconds(field: str, value: Any) -> float:
    """``value`` as a float if it is a positive, finite number of seconds.

    :raises ConfigError: naming ``field``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(field, f"expected a number of seconds, got {describe(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(field, f"must be a positive, finite number of seconds, got {value!r}")
    return seconds
