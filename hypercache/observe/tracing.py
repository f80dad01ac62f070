"""OpenTelemetry tracing, through the API alone on the hot path.

Off by default. A node turns it on with ``--tracing on`` (:func:`configure_tracing`,
which needs the SDK and the OTLP/HTTP exporter: ``pip install 'hypercache[otel]'``);
an embedded node or a test hands a provider of its own to :func:`install`. While it
is off, :data:`tracer` is ``None`` and every helper here returns ``None`` or a
shared no-op at once: nothing is allocated per request.

Spans (``docs/observability.md`` draws the tree)::

    Set | Get | Delete              the coordinator, one per client operation
      ReplicaFanout                 the requests to the key's owners
        ReplicaRequest              one per owner (``hypercache.peer``)
          ReplicaApply              in the owner's own process
      ReadRepair                    a read's push to a stale owner
        ReplicaApply
    HintReplay                      one per replayed batch of hints
    MerkleSync                      one per anti-entropy round with a peer
      MerklePull                    one per partition range pulled
    Rebalance                       one per partition batch streamed

Across processes the W3C ``traceparent`` (and ``tracestate``) travel as the optional
sixth element of a request frame (``docs/protocol.md``), sent only to a peer whose
HELLO answer lists the ``trace`` feature, so a node of the previous version still
interoperates. Sampling is the SDK's (``OTEL_TRACES_SAMPLER``, parent-based by
default): a request whose parent is not sampled records nothing anywhere.

Attributes never hold a key or a value: :func:`key_hash` names a key.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hypercache.errors import ConfigError

__all__ = [
    "ATTR_ACKS",
    "ATTR_APPLIED",
    "ATTR_COUNT",
    "ATTR_KEY_HASH",
    "ATTR_LEVEL",
    "ATTR_OP",
    "ATTR_OUTCOME",
    "ATTR_PARTITION",
    "ATTR_PEER",
    "ATTR_REPLICAS",
    "SERVICE_NAME",
    "OpTrace",
    "ReplicaCall",
    "annotate",
    "begin",
    "client_op",
    "configure_tracing",
    "current_carrier",
    "extract",
    "failed",
    "in_context",
    "install",
    "key_hash",
    "serve",
    "serve_async",
    "shutdown_tracing",
    "span",
    "tracer",
]

_log = logging.getLogger("hypercache.trace")

#: ``service.name`` of a node's resource.
SERVICE_NAME: Final = "hypercache-node"
#: Attribute names.
ATTR_PEER: Final = "hypercache.peer"
ATTR_OP: Final = "hypercache.op"
ATTR_KEY_HASH: Final = "hypercache.key_hash"
ATTR_LEVEL: Final = "hypercache.consistency"
ATTR_REPLICAS: Final = "hypercache.replicas"
ATTR_ACKS: Final = "hypercache.acks"
ATTR_OUTCOME: Final = "hypercache.outcome"
ATTR_COUNT: Final = "hypercache.count"
ATTR_PARTITION: Final = "hypercache.partition"
ATTR_APPLIED: Final = "hypercache.applied"

#: The node's tracer while tracing is on; ``None`` when off (the hot path reads it).
tracer: Tracer | None = None
_provider: Any = None
# Whether the provider's sampler never samples a root (parent-based over ratio 0 or
# always-off): an operation that arrives without a parent then skips the SDK's
# sampling (which makes a trace id and a non-recording span: ~5 us a request).
_roots_unsampled = False
# Set while a request that came with a parent not sampled is served (see serve):
# nothing it does is recorded, and it sends no trace context on.
_unsampled: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "hypercache_unsampled", default=False
)
# The client's tracer, from the global provider it was got from.
_client: tuple[Any, Tracer | None] = (None, None)

_propagator: Final = TraceContextTextMapPropagator()
_NULL: Final = contextlib.nullcontext()
# A traceparent is 55 characters; a tracestate at most 32 members of 256 (W3C).
_MAX_CARRIER: Final = 8192


def key_hash(key: bytes) -> str:
    """What a span says of a key: 16 hex digits of its BLAKE2b hash (never the key)."""
    return hashlib.blake2b(key, digest_size=8).hexdigest()


# ------------------------------------------------------------------- set-up


def install(provider: Any, *, version: str = "") -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``); ``None`` turns tracing off.

    Does not touch OpenTelemetry's global provider: several embedded nodes (or a
    test) may each hand one in turn.
    """
    global tracer, _provider, _roots_unsampled
    _provider = provider
    _roots_unsampled = provider is not None and _never_samples_roots(
        getattr(provider, "sampler", None)
    )
    tracer = None if provider is None else provider.get_tracer("hypercache", version)


def _never_samples_roots(sampler: Any) -> bool:
    """Whether ``sampler`` (an SDK sampler) drops every span without a parent."""
    try:
        from opentelemetry.sdk.trace.sampling import (
            ALWAYS_OFF,
            ParentBased,
            TraceIdRatioBased,
        )
    except ImportError:  # not the SDK's: ask it every time
        return False
    # ParentBased keeps the sampler of roots as _root (no public accessor).
    root = getattr(sampler, "_root", None) if isinstance(sampler, ParentBased) else sampler
    if isinstance(root, TraceIdRatioBased):
        return root.rate <= 0
    return root is ALWAYS_OFF


def configure_tracing(
    *,
    enabled: bool,
    node_id: str,
    version: str,
    env: Mapping[str, str] | None = None,
    exporter: Any = None,
) -> Any:
    """Turn tracing on for this process (a ``hypercache-node``): a ``TracerProvider``
    whose resource is ``service.name=hypercache-node``, ``service.instance.id=<node
    id>``, ``service.version`` (merged with ``OTEL_RESOURCE_ATTRIBUTES``), the SDK's
    sampler (``OTEL_TRACES_SAMPLER``/``_ARG``; parent-based, always on by default),
    and a batch processor to ``exporter`` or to what ``OTEL_TRACES_EXPORTER``
    names (``otlp`` by default, over ``http/protobuf`` to
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``console``; ``none``). It becomes the global
    provider too, so that libraries traced in the same process join the trace.

    Return the provider, or ``None`` when ``enabled`` is false (nothing is done).

    :raises ConfigError: the SDK or the exporter is not installed, or the
        environment names an exporter or a protocol this build cannot use
        (field ``tracing``).
    """
    if not enabled:
        return None
    env = os.environ if env is None else env
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "tracing", "needs the OpenTelemetry SDK: pip install 'hypercache[otel]'"
        ) from None
    resource = Resource.create(
        {
            "service.name": SERVICE_NAME,
            "service.instance.id": node_id,
            "service.version": version,
        }
    )
    provider = TracerProvider(resource=resource)
    exporters = [exporter] if exporter is not None else _exporters_from_env(env)
    for exp in exporters:
        provider.add_span_processor(BatchSpanProcessor(exp))
    otel_trace.set_tracer_provider(provider)
    install(provider, version=version)
    return provider


def _exporters_from_env(env: Mapping[str, str]) -> list[Any]:
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters: list[Any] = []
    for name in names:
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            if protocol != "http/protobuf":
                raise ConfigError(
                    "tracing",
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: this build exports "
                    "over 'http/protobuf' only",
                )
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                raise ConfigError(
                    "tracing", "needs the OTLP/HTTP exporter: pip install 'hypercache[otel]'"
                ) from None
            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            raise ConfigError(
                "tracing",
                f"OTEL_TRACES_EXPORTER={name!r}: expected 'otlp', 'console' or 'none'",
            )
    return exporters


def shutdown_tracing() -> None:
    """Flush the spans not exported yet and turn tracing off (a node stopping)."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


# ------------------------------------------------------------- propagation


def _carrier(sc: SpanContext) -> dict[str, str]:
    carrier = {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"}
    if sc.trace_state:
        carrier["tracestate"] = sc.trace_state.to_header()
    return carrier


def carrier_of(span_: Span) -> dict[str, str]:
    """The ``traceparent``/``tracestate`` map that names ``span_`` as a parent."""
    return _carrier(span_.get_span_context())


def _runtime_context_getter() -> Callable[[], Context]:
    # The current context is read on every request a connection sends: through the
    # API it costs ~0.7 us with no span at all, the ContextVar itself ~40 ns. The
    # default runtime context keeps it in ``_current_context``; another one (chosen
    # with OTEL_PYTHON_CONTEXT) goes through the API.
    var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    get = getattr(var, "get", None)
    return get if callable(get) else otel_context.get_current


_current_context: Final = _runtime_context_getter()


# The last carrier made, by the span context it names: the requests sent inside one
# span (a caller's, over many cache operations) share it, formatted once (~3 us).
_last: tuple[SpanContext | None, dict[str, str] | None] = (None, None)


def current_carrier() -> dict[str, str] | None:
    """The carrier of the current span, or ``None`` when there is none (no allocation
    then): what a client connection sends along with a request (to be read, not
    changed: one is shared by the requests of a span)."""
    global _last
    ctx = _current_context()
    if not ctx:  # an empty context holds no span
        return None
    sc = otel_trace.get_current_span(ctx).get_span_context()
    known, carrier = _last
    if sc is known:
        return carrier
    carrier = _carrier(sc) if sc.is_valid else None
    _last = (sc, carrier)
    return carrier


def extract(carrier: Any) -> Context | None:
    """The context a received carrier names, or ``None`` when it is malformed or
    names no valid span (it is then ignored: a bad carrier fails no request)."""
    if type(carrier) is not dict or len(carrier) > 2:
        return None
    size = 0
    for k, v in carrier.items():
        if type(k) is not str or type(v) is not str:
            return None
        size += len(v)
    if size > _MAX_CARRIER:
        return None
    ctx = _propagator.extract(carrier)
    if not otel_trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


# ---------------------------------------------------------------- servers


def serve(op_name: str, replica_op: bool, carrier: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``, a request that came with ``carrier``, inside its trace: the
    received context is the current one meanwhile (a coordinator's span is its
    child; log lines carry its trace id) and, for a replica's request
    (``replica_op``), a ``ReplicaApply`` span covers it. Without tracing, or with a
    carrier that names no sampled span, it is a plain call."""
    tr = tracer
    if tr is None:
        return fn(*args)
    if not _sampled_flag(carrier):
        # A parent not sampled: nothing is recorded under it, here or further on,
        # so its context is not even parsed. A replica's op is a plain call; a
        # coordinated one runs with the flag that makes begin() record nothing
        # (and sends no context to the replicas: they would record nothing either).
        if replica_op:
            return fn(*args)
        flag = _unsampled.set(True)
        try:
            return fn(*args)
        finally:
            _unsampled.reset(flag)
    ctx = extract(carrier)
    if ctx is None:
        return fn(*args)
    token = otel_context.attach(ctx)
    try:
        if not replica_op:
            return fn(*args)
        parent = otel_trace.get_current_span(ctx).get_span_context()
        if not parent.trace_flags.sampled:
            return fn(*args)
        with tr.start_as_current_span(
            "ReplicaApply", kind=SpanKind.SERVER, attributes={ATTR_OP: op_name}
        ):
            _log.debug("serving %s", op_name, extra={"op": op_name})
            return fn(*args)
    finally:
        otel_context.detach(token)


async def serve_async(
    op_name: str,
    replica_op: bool,
    carrier: Any,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
) -> Any:
    """:func:`serve` for a request handled in a task of its own (a handler's slow
    path): ``await fn(*args)`` inside the trace that came with ``carrier``. The
    task's own copy of the context is changed, nobody else's."""
    tr = tracer
    ctx = extract(carrier) if tr is not None else None
    if tr is None or ctx is None:
        return await fn(*args)
    token = otel_context.attach(ctx)
    try:
        parent = otel_trace.get_current_span(ctx).get_span_context()
        if not replica_op or not parent.trace_flags.sampled:
            return await fn(*args)
        with tr.start_as_current_span(
            "ReplicaApply", kind=SpanKind.SERVER, attributes={ATTR_OP: op_name}
        ):
            _log.debug("serving %s", op_name, extra={"op": op_name})
            return await fn(*args)
    finally:
        otel_context.detach(token)


def in_context() -> Callable[..., Any] | None:
    """What runs a callback later inside the current trace context (a read that
    turns into a write from an answer's callback, where the context is the
    loop's): ``contextvars.copy_context().run`` while tracing is on and a span is
    current, else ``None`` (nothing allocated; call the function directly)."""
    if tracer is None or not (_current_context() or _unsampled.get()):
        return None
    return contextvars.copy_context().run


def _sampled_flag(carrier: Any) -> bool:
    """Whether a received carrier's ``traceparent`` says its span is sampled, read
    from its flags without parsing the rest (``00-<32>-<16>-<flags>``); a carrier
    of another form (a later version) is taken as sampled, and parsed."""
    if type(carrier) is not dict:
        return True
    tp = carrier.get("traceparent")
    if type(tp) is not str or len(tp) != 55 or tp[:3] != "00-":
        return True
    last = tp[54]
    return last not in "02468ace"  # bit 0 of the flags: sampled


def span(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: a span named ``name``, current within it, when tracing is
    on (it records an exception that escapes and sets the error status); a shared
    no-op otherwise (nothing allocated). For the background loops."""
    tr = tracer
    if tr is None:
        return _NULL
    return tr.start_as_current_span(name, attributes=attributes)


def failed(span_: Any, error: BaseException) -> None:
    """Mark ``span_`` (what :func:`span` gave; ``None`` when off) failed with ``error``."""
    if span_ is not None:
        span_.record_exception(error)
        span_.set_status(Status(StatusCode.ERROR, type(error).__name__))


def annotate(span_: Any, key: str, value: Any) -> None:
    """Set an attribute on ``span_`` (what :func:`span` gave; ``None`` when off)."""
    if span_ is not None:
        span_.set_attribute(key, value)


# ------------------------------------------------------------ coordinators


class ReplicaCall:
    """The ``ReplicaRequest`` span of one owner's request; :attr:`carrier` goes with it."""

    __slots__ = ("_op", "carrier", "span")

    def __init__(self, op: OpTrace | None, span_: Span) -> None:
        self._op = op
        self.span = span_
        self.carrier = carrier_of(span_)

    def done(self, error: BaseException | str | None = None) -> None:
        """The owner answered (``error`` None) or failed."""
        _end(self.span, error)
        if self._op is not None:
            self._op._child_done()


def _end(span_: Span, error: BaseException | str | None) -> None:
    if error is not None:
        if isinstance(error, BaseException):
            span_.record_exception(error)
            span_.set_status(Status(StatusCode.ERROR, type(error).__name__))
        else:
            span_.set_status(Status(StatusCode.ERROR, error))
        span_.set_attribute(ATTR_OUTCOME, "error")
    else:
        span_.set_attribute(ATTR_OUTCOME, "ok")
    span_.end()


class OpTrace:
    """The spans of one coordinated client operation: the operation's own (``Set``,
    ``Get``, ``Delete``), its ``ReplicaFanout`` child and one ``ReplicaRequest``
    under it per owner. The fan-out ends when its last owner did (possibly after
    the operation was decided, at its quorum)."""

    __slots__ = ("_decided", "_fanout", "_fanout_ctx", "_open", "_tracer", "span")

    def __init__(self, tr: Tracer, span_: Span, replicas: int) -> None:
        self._tracer = tr
        self.span = span_
        self._fanout = tr.start_span(
            "ReplicaFanout",
            context=otel_trace.set_span_in_context(span_),
            attributes={ATTR_REPLICAS: replicas},
        )
        self._fanout_ctx = otel_trace.set_span_in_context(self._fanout)
        self._open = 0
        self._decided = False

    def replica(self, peer: str, op: str) -> ReplicaCall:
        """Start the ``ReplicaRequest`` span of a request to ``peer``."""
        self._open += 1
        child = self._tracer.start_span(
            "ReplicaRequest",
            context=self._fanout_ctx,
            kind=SpanKind.CLIENT,
            attributes={ATTR_PEER: peer, ATTR_OP: op},
        )
        return ReplicaCall(self, child)

    def local(self, peer: str, op: str, error: BaseException | str | None = None) -> None:
        """A replica handled without a request (this node's own, or one down)."""
        self.replica(peer, op).done(error)

    def repair(self, peer: str) -> ReplicaCall:
        """Start the ``ReadRepair`` span of a push to ``peer`` (under the operation's
        own span: the fan-out has ended by then)."""
        child = self._tracer.start_span(
            "ReadRepair",
            context=otel_trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={ATTR_PEER: peer, ATTR_OP: "r_put"},
        )
        return ReplicaCall(None, child)

    def _child_done(self) -> None:
        self._open -= 1
        if self._open == 0 and self._decided:
            self._fanout.end()

    def decided(self, acks: int, error: BaseException | None = None) -> None:
        """The operation is decided: ``acks`` owners acknowledged, ``error`` when it failed."""
        span_ = self.span
        span_.set_attribute(ATTR_ACKS, acks)
        self._fanout.set_attribute(ATTR_ACKS, acks)
        _end(span_, error)
        self._decided = True
        if self._open == 0:
            self._fanout.end()


def begin(name: str, key: bytes, level: str, replicas: int) -> OpTrace | None:
    """The spans of a client operation coordinated here, child of the current context
    (what the client's request carried); ``None`` when tracing is off or the
    operation is not sampled (nothing is recorded, nor sent on)."""
    tr = tracer
    if tr is None or _unsampled.get():
        return None
    ctx = _current_context()  # (an empty one holds no parent: ~2 us less to find out)
    parent = otel_trace.get_current_span(ctx).get_span_context() if ctx else None
    if parent is not None and parent.is_valid:
        if not parent.trace_flags.sampled:
            return None
    elif _roots_unsampled:
        return None
    span_ = tr.start_span(
        name, kind=SpanKind.SERVER, attributes={ATTR_LEVEL: level, ATTR_REPLICAS: replicas}
    )
    if not span_.is_recording():
        span_.end()
        return None
    span_.set_attribute(ATTR_KEY_HASH, key_hash(key))  # (hashed only when recorded)
    return OpTrace(tr, span_, replicas)


# ----------------------------------------------------------------- clients


def _client_tracer() -> Tracer | None:
    global _client
    provider = otel_trace.get_tracer_provider()
    if isinstance(provider, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider):
        return tracer  # the global one is not set: this process's own, if any
    known, tr = _client
    if provider is not known:  # (a tracer made once per provider, not per operation)
        tr = provider.get_tracer("hypercache.client")
        _client = (provider, tr)
    return tr


@contextlib.contextmanager
def _client_span(tr: Tracer, name: str, key: bytes | None) -> Iterator[None]:
    attributes = {} if key is None else {ATTR_KEY_HASH: key_hash(key)}
    with tr.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
        yield


def client_op(name: str, key: bytes | None = None) -> Any:
    """A context manager around one client operation: a ``CLIENT`` span named
    ``name`` when tracing is configured in this process (its global provider is
    set); a shared no-op otherwise. Requests sent meanwhile carry the current span
    (this one, or the caller's own) to the node."""
    tr = _client_tracer()
    if tr is None:
        return _NULL
    return _client_span(tr, name, key)
