"""A local OTLP/HTTP trace receiver: what the processes' exporters (`topics/tracing.py`) send
to `POST /v1/traces` (protobuf `ExportTraceServiceRequest`) is answered 200 and either
discarded (`bench.ab --tracing on`: the cost of exporting, without a collector's) or decoded
and kept (tests/test_tracing.py). A real HTTP server on its own thread, so that it answers
whatever the caller's event loop is doing."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span, as the tests read it."""

    service: str  # the resource's service.name
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    name: str
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT, …
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    status: str  # STATUS_CODE_UNSET, STATUS_CODE_OK, STATUS_CODE_ERROR


@dataclass
class OtlpSink:
    """Serves until closed; `spans` holds what was received when `keep` is set."""

    keep: bool = False
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The base URL for `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter adds /v1/traces)."""
        assert self._server is not None
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> OtlpSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path != TRACES_PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                sink._received(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per export would drown the caller's output

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def _received(self, body: bytes) -> None:
        spans = decode(body) if self.keep else []
        with self._lock:
            self.requests += 1
            self.spans += spans


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one `ExportTraceServiceRequest`."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(ReceivedSpan(
                    service=str(resource.get("service.name", "")),
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None, name=span.name,
                    kind=Span.SpanKind.Name(span.kind), attributes=_attributes(span.attributes),
                    links=tuple((link.trace_id.hex(), link.span_id.hex())
                                for link in span.links),
                    status=Status.StatusCode.Name(span.status.code)))
    return out


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind is None:
        return None
    return getattr(value, kind)


def main(argv: list[str] | None = None) -> None:
    """`python -m compose.otlp_sink --port N`: a sink that discards, until killed (bench.ab
    runs it as a process of its own, off the load generator's interpreter)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compose.otlp_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    sink = OtlpSink(host=args.host, port=args.port).start()
    assert sink._thread is not None
    sink._thread.join()


if __name__ == "__main__":
    main()
