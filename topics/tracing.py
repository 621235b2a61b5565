"""Tracing in every process: OpenTelemetry spans exported over OTLP/HTTP (protobuf), set up
from the standard `OTEL_*` environment variables, and the W3C `traceparent` that carries a
request's trace from its client through Kafka (`topics/names.py` `H_TRACEPARENT`, on
`llm.requests`, `llm.classified`, `llm.usage` and `audit.events`) and back in its response.

Each process opens one `Tracing` in its lifespan (`open_tracing`) and closes it there, which
flushes the spans still queued. Off (the default: `OTEL_TRACES_EXPORTER` unset or `none`, or
`OTEL_SDK_DISABLED=true`) no span is ever created: `Tracing.span` hands back one shared no-op
context manager, chosen once. The request's trace id still travels (the ingress makes one
when the client sent none) so that logs correlate (`topics/logs.py`) and every response
carries `x-trace-id` and `traceparent` (`ingress/middleware.py`).

Spans: ingress/middleware.py (server), ingress/pipeline.py (produce, reply wait),
ingress/chat.py (reply relay), workers/router/* (consume, decision, attempts, reply publish,
usage produce), workers/classifier/stage.py, workers/usage/main.py, workers/audit/main.py."""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
)

from topics import names

if TYPE_CHECKING:  # the SDK is imported only by a process that traces (open_tracing)
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["Link", "Span", "SpanContext", "SpanKind", "Tracing", "current_traceparent",
           "open_tracing"]

# The request id the logs show (`topics/logs.py`), carried in OpenTelemetry's context beside
# the current span: whatever runs for a request finds both there.
REQUEST_ID_KEY: Final = "switchyard.request_id"
_OFF_SPAN: Final = contextlib.nullcontext(INVALID_SPAN)  # reusable: it holds nothing
_UNSAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
# What the last spans' export may take when a process stops; past it they are dropped.
_FLUSH_TIMEOUT_S: Final = 2.0


class Tracing:
    """One process's tracer: on (an SDK provider with a batching OTLP exporter) or off."""

    def __init__(self, tracer: Tracer | None = None, *, content: bool = False,
                 provider: TracerProvider | None = None) -> None:
        self._tracer = tracer
        self._provider = provider  # when on
        self.on = tracer is not None
        # SWITCHYARD_TRACE_CONTENT: prompts and completions in the attempts' spans.
        self.content = content and self.on

    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
             parent: otel_context.Context | None = None,
             attributes: dict[str, Any] | None = None,
             links: Sequence[Link] | None = None) -> AbstractContextManager[Span]:
        """A span made current for the `with` block (child of the current one, or of
        `parent`); off, the shared no-op one, and nothing made current."""
        if self._tracer is None:
            return _OFF_SPAN
        return self._tracer.start_as_current_span(name, context=parent, kind=kind,
                                                  attributes=attributes, links=links)

    def start(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
              parent: otel_context.Context | None = None,
              attributes: dict[str, Any] | None = None) -> Span:
        """A span the caller ends, not made current (it outlives the code that starts it,
        e.g. a reply relayed frame by frame); off, a no-op one."""
        if self._tracer is None:
            return INVALID_SPAN
        return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)

    def consume(self, name: str, record: Any, *, request_id: str | None = None,
                attributes: dict[str, Any] | None = None) -> AbstractContextManager[Span]:
        """The span of handling one Kafka record, child of the span whose context its
        `traceparent` header carries. Off, that context is made current without a span, so
        that logs and the messages this handler produces keep the request's trace id."""
        parent = context_of(header_value(record.headers, names.H_TRACEPARENT),
                            request_id=request_id)
        if self._tracer is None:
            return _attached(parent)
        return self._consumed(self._tracer, name, parent, {
            "messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset, **(attributes or {})})

    @staticmethod
    @contextlib.contextmanager
    def _consumed(tracer: Tracer, name: str, parent: otel_context.Context | None,
                  attributes: dict[str, Any]) -> Iterator[Span]:
        # The parent context made current first: the span's context keeps what it carries
        # besides the remote span (the request id the logs show).
        with _attached(parent or otel_context.Context()), tracer.start_as_current_span(
                name, kind=SpanKind.CONSUMER, attributes=attributes) as span:
            yield span

    def request(self, traceparent: str | None, request_id: str, method: str, route: str,
                path: str) -> tuple[Span, SpanContext, otel_context.Context]:
        """A request's server span (child of the client's `traceparent` when it sent a valid
        one), its span context (what the response and the messages carry) and the context
        to make current while it is served. Off, no span (a no-op one): the ids are made up
        here, under the client's trace when it sent one."""
        parent = parse_traceparent(traceparent)
        ctx = otel_context.set_value(REQUEST_ID_KEY, request_id, otel_context.Context())
        if self._tracer is None:
            span_context = new_span_context(parent)
            return INVALID_SPAN, span_context, trace.set_span_in_context(
                NonRecordingSpan(span_context), ctx)
        if parent is not None:
            ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
        span = self._tracer.start_span(f"{method} {route}", context=ctx, kind=SpanKind.SERVER,
                                       attributes={"http.request.method": method,
                                                   "url.path": path})
        return span, span.get_span_context(), trace.set_span_in_context(span, ctx)

    def __enter__(self) -> Tracing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Export what is queued (bounded: a collector that does not answer costs at most
        `_FLUSH_TIMEOUT_S`) and stop the exporter."""
        provider = self._provider
        if provider is None:
            return
        self._provider = None
        # The exporter retries with backoff; a daemon thread bounds the wait without
        # keeping the process alive for it.
        closing = threading.Thread(target=provider.shutdown, name="otel-shutdown",
                                   daemon=True)
        closing.start()
        closing.join(_FLUSH_TIMEOUT_S)


def open_tracing(process: str, *, content: bool = False,
                 environ: dict[str, str] | None = None) -> Tracing:
    """The process's tracing, from the standard variables: `OTEL_SDK_DISABLED`,
    `OTEL_TRACES_EXPORTER` (`otlp` or `none`, the default), `OTEL_EXPORTER_OTLP_ENDPOINT` /
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_TRACES_SAMPLER` / `…_ARG` (parent-based
    always-on by default), `OTEL_SERVICE_NAME` (default `switchyard-<process>`),
    `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`. Close it (`Tracing.close`) when the process
    stops. `environ` (tests): what decides on or off, instead of the process's environment."""
    env = os.environ if environ is None else environ
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "none").split(",")}
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" \
            or not exporters - {"none", ""}:
        return Tracing()
    unknown = exporters - {"otlp", "none", ""}
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: {', '.join(sorted(unknown))} is not supported "
                         "(otlp, over HTTP/protobuf, or none)")
    # Imported only when on: a process that does not trace never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    detected = OTELResourceDetector().detect()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    defaults = {} if "service.name" in detected.attributes \
        else {"service.name": f"switchyard-{process}"}
    # The sampler: TracerProvider reads OTEL_TRACES_SAMPLER (and its argument) itself.
    provider = TracerProvider(resource=Resource.create(defaults))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider.get_tracer("switchyard"), content=content, provider=provider)


def header_value(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return value.decode("ascii", "replace")
    return None


def with_header(headers: Sequence[tuple[str, bytes]] | None, name: str,
                value: str | None) -> list[tuple[str, bytes]]:
    """`headers` with `name` replaced by `value` (removed when None)."""
    out = [(k, v) for k, v in headers or () if k != name]
    if value is not None:
        out.append((name, value.encode()))
    return out


def parse_traceparent(header: str | None) -> SpanContext | None:
    """The span context of a W3C `traceparent` (version 00's layout; later versions are read
    the same way, as the spec asks), or None when absent or malformed."""
    if not header:
        return None
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 \
            or len(parts[2]) != 16 or len(parts[3]) != 2 or (parts[0] == "00" and len(parts) > 4):
        return None
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
        flags = int(parts[3], 16)
        int(parts[0], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def context_of(traceparent: str | None, *,
               request_id: str | None = None) -> otel_context.Context | None:
    """An OpenTelemetry context whose current span is the remote one `traceparent` names
    (None: neither a parent nor a request id)."""
    parent = parse_traceparent(traceparent)
    if parent is None and request_id is None:
        return None
    ctx = otel_context.Context()
    if request_id is not None:
        ctx = otel_context.set_value(REQUEST_ID_KEY, request_id, ctx)
    if parent is not None:
        ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
    return ctx


def new_span_context(parent: SpanContext | None) -> SpanContext:
    """Ids for a request whose ingress traces nothing: the client's trace (a new span id
    under it), or a new trace. Unsampled: no span of it is recorded here."""
    span_id = random.getrandbits(64) or 1
    if parent is not None:
        return SpanContext(parent.trace_id, span_id, is_remote=False,
                           trace_flags=parent.trace_flags)
    return SpanContext(random.getrandbits(128) or 1, span_id, is_remote=False,
                       trace_flags=_UNSAMPLED)


def traceparent_of(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 1:02x}"


def current_traceparent() -> str | None:
    """The `traceparent` of the current span (recorded or not), None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    return traceparent_of(ctx) if ctx.is_valid else None


def current_request_id() -> str | None:
    value = otel_context.get_value(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


@contextlib.contextmanager
def _attached(ctx: otel_context.Context | None) -> Iterator[Span]:
    if ctx is None:
        yield INVALID_SPAN
        return
    token = otel_context.attach(ctx)
    try:
        yield INVALID_SPAN
    finally:
        otel_context.detach(token)


