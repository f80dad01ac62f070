"""Observability: OpenTelemetry tracing and structured (JSON) logs.

A ground-floor package, beside :mod:`hypercache.errors`: every layer may import it,
and it imports nothing of hypercache but the errors. Its hot-path API costs one
module attribute read when tracing is off (:data:`hypercache.observe.tracing.tracer`
is ``None``) and allocates nothing.

* :mod:`hypercache.observe.tracing` — spans through the OpenTelemetry API; the SDK and
  the OTLP/HTTP exporter come with ``pip install 'hypercache[otel]'``.
* :mod:`hypercache.observe.logs` — ``--log-format text|json``, rate-limited warnings.
"""

from hypercache.observe import logs, tracing
from hypercache.observe.logs import RateLimiter, setup_logging
from hypercache.observe.tracing import configure_tracing, key_hash, shutdown_tracing

__all__ = [
    "RateLimiter",
    "configure_tracing",
    "key_hash",
    "logs",
    "setup_logging",
    "shutdown_tracing",
    "tracing",
]
