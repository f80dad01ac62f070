"""Log set-up of a node: ``--log-format text|json``, and rate-limited warnings.

JSON (python-json-logger): one object a line, with ``ts`` (RFC 3339, UTC),
``level``, ``logger``, ``msg``, ``node_id``, ``trace_id`` and ``span_id`` when the
line was logged inside a span (32 and 16 hex digits, as OpenTelemetry spells them),
then the fields the event gave with ``extra=`` (``op``, ``peer``, ``partition``,
``error``, counts). Never a value, a token or a secret: call sites log keys' hashes
at most.

A warning that can repeat (a peer down, a cap biting) goes through a
:class:`RateLimiter`: one line per key and interval, the next one saying how many
were suppressed meanwhile, so a dead peer cannot flood the log.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, Final

from opentelemetry import trace as otel_trace
from pythonjsonlogger.json import JsonFormatter

from hypercache.errors import ConfigError

__all__ = ["LOG_FORMATS", "JsonLogFormatter", "RateLimiter", "setup_logging"]

#: Accepted values of ``--log-format``.
LOG_FORMATS: Final = ("text", "json")


class JsonLogFormatter(JsonFormatter):
    """The node's JSON lines (see the module docstring)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(json_ensure_ascii=False)
        self.node_id = node_id

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = (
            datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        log_data["msg"] = record.getMessage()
        log_data["node_id"] = self.node_id
        sc = otel_trace.get_current_span().get_span_context()
        if sc.is_valid:
            log_data["trace_id"] = f"{sc.trace_id:032x}"
            log_data["span_id"] = f"{sc.span_id:016x}"
        # The event's own fields (extra=...), the reserved LogRecord attributes left out.
        super().add_fields(log_data, record, message_dict)
        log_data.pop("message", None)
        if record.exc_info and "exc_info" not in log_data:
            log_data["exc_info"] = self.formatException(record.exc_info)


def setup_logging(
    *, level: str, log_format: str, node_id: str, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger's lines to ``stream`` (stderr) in ``log_format``.

    :raises ConfigError: ``log_format`` is not one of :data:`LOG_FORMATS`.
    """
    if log_format not in LOG_FORMATS:
        raise ConfigError("log_format", f"expected 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(node_id))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [" + node_id + "] %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The OTLP exporter's HTTP library logs every export at debug: not the node's news.
    logging.getLogger("urllib3").setLevel(max(root.level, logging.WARNING))
    return handler


class RateLimiter:
    """At most one line per key every ``interval`` seconds; the next line that gets
    through says how many were suppressed since (field ``suppressed``).

    Keys are what repeats (``("peer_down", peer)``); at most ``max_keys`` are
    remembered (the oldest are forgotten past it), so the limiter is bounded too.
    """

    __slots__ = ("_clock", "_seen", "interval", "max_keys")

    def __init__(
        self,
        interval: float = 10.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [time of the last line logged, lines suppressed since]
        self._seen: dict[Any, list[float]] = {}

    def log(
        self,
        logger: logging.Logger,
        level: int,
        key: Any,
        msg: str,
        *args: Any,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Log ``msg % args`` unless a line of ``key`` went out less than ``interval``
        ago; return whether it was logged."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        suppressed = 0 if seen is None else int(seen[1])
        if seen is None:
            if len(self._seen) >= self.max_keys:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = [now, 0]
        else:
            seen[0], seen[1] = now, 0
        fields = dict(extra or {})
        if suppressed:
            fields["suppressed"] = suppressed
            msg += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        logger.log(level, msg, *args, extra=fields)
        return True

    def warning(self, logger: logging.Logger, key: Any, msg: str, *args: Any, **kw: Any) -> bool:
        """:meth:`log` at ``WARNING``."""
        return self.log(logger, logging.WARNING, key, msg, *args, **kw)
