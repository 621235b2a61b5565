"""Traces and logs on the real stack: every process (ingress, classifier stage, router, usage
worker, audit writer) exports its spans over OTLP/HTTP to a real receiver
(compose/otlp_sink.py), and one request reads as one connected trace, from the ingress's
server span through Kafka, the classifier, the routing decision, the provider attempt(s) and
the reply, to the usage write. With tracing off, responses still carry their trace id and
nothing is exported. Log lines are JSON objects that carry the trace id of the request they
were written for.

The stack is this module's own: its processes run with the `OTEL_*` variables set, which the
rest of the suite's gateway must not have."""

from __future__ import annotations

import io
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import openai
import orjson
import pytest

from compose.gateway import Gateway
from compose.otlp_sink import OtlpSink, ReceivedSpan
from compose.stack import LocalStack, free_port
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import TENANTS, ingresses, platform
from topics.catalog import load_catalog
from topics.logs import JsonFormatter
from topics.settings import RouterSettings, Settings
from topics.tracing import Tracing, context_of, open_tracing, parse_traceparent
from workers.router.attempt import Report, describe_attempt

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")
MODEL = "gpt-4o-mini"
# What every request's trace holds, whatever its shape (the ingress's span is named after
# its route).
REQUEST_SPANS = {
    "POST /v1/chat/completions",  # ingress: server span
    "llm.requests publish",  # ingress: Kafka produce
    "llm.requests process",  # classifier stage: consume
    "classify",
    "llm.classified publish",  # classifier stage: produce
    "llm.classified process",  # router: consume
    "route decision",
    f"chat {MODEL}",  # router: the provider attempt
    "reply publish",  # router: the reply's frames
    "reply wait",  # ingress: the first answer
    "llm.usage publish",  # router: the usage events
    "llm.usage process",  # usage worker: until the event is in the ledger
}
SERVICES = {"switchyard-ingress", "switchyard-classifier", "switchyard-router",
            "switchyard-usage"}


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    with OtlpSink(keep=True) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(sink: OtlpSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose processes all trace, with the classifier as its own stage (so that
    every kind of process is in the trace), exporting to `sink` within 0.1 s of a span's end."""
    base = Settings(router=RouterSettings(shutdown_grace_s=2, classify_inline=False))
    with LocalStack.ephemeral(base) as stack:
        fake_port = free_port()
        fake = f"http://127.0.0.1:{fake_port}/v1"
        settings = stack.settings.model_copy(update={
            "ingress": stack.settings.ingress.model_copy(update={"port": free_port()}),
            "fallback_upstream_url": fake, "provider_base_urls": {"openai": fake}})
        openai_key = load_catalog(settings.catalog_path).providers["openai"].api_key_env
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "100", "SWITCHYARD_LOG_FORMAT": "json",
               openai_key: "env-key-openai"}
        with Gateway(settings, tmp_path_factory.mktemp("traced-logs"),
                     fake_upstream_port=fake_port, extra_env=env) as running:
            yield running


@pytest.fixture(scope="module")
async def key(traced: Gateway) -> str:
    conn = await asyncpg.connect(traced.settings.postgres.owner_dsn)
    try:
        return (await create_key(conn, "tracing"))[1]
    finally:
        await conn.close()


@pytest.fixture
async def client(traced: Gateway, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{traced.url}/v1", api_key=key,
                                  max_retries=0, timeout=30) as sdk:
        yield sdk


@pytest.fixture
async def fake(traced: Gateway) -> AsyncIterator[FakeAdmin]:
    admin = FakeAdmin(traced.settings.fallback_upstream_url or "")
    await admin.reset()
    try:
        yield admin
    finally:
        await admin.reset()
        await admin.aclose()


def _prompt() -> list[dict[str, str]]:
    # A marker the spans must not contain: prompts stay out of traces by default.
    return [{"role": "user", "content": f"the secret word is {uuid.uuid4().hex}"}]


async def _trace(sink: OtlpSink, trace_id: str, names: set[str]) -> list[ReceivedSpan]:
    """The trace's spans once every one of `names` has arrived."""
    def complete() -> list[ReceivedSpan] | None:
        spans = [s for s in sink.received() if s.trace_id == trace_id]
        return spans if names <= {s.name for s in spans} else None

    spans: list[ReceivedSpan] = await eventually(complete, timeout_s=30)
    return spans


def _assert_connected(spans: list[ReceivedSpan], root_parent: str | None = None) -> None:
    """One root (the ingress's server span, whose parent is the client's span if it sent
    one), every other span's parent in the trace."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id not in ids]
    assert [(r.name, r.parent_span_id) for r in roots] == \
        [("POST /v1/chat/completions", root_parent)], roots
    assert roots[0].kind == "SPAN_KIND_SERVER"
    assert roots[0].attributes["http.response.status_code"] == 200
    assert roots[0].attributes["http.route"] == "/v1/chat/completions"


def _chain(spans: list[ReceivedSpan], name: str) -> list[str]:
    """The names from the span called `name` up to the root."""
    by_id = {s.span_id: s for s in spans}
    span: ReceivedSpan | None = next(s for s in spans if s.name == name)
    out = []
    while span is not None:
        out.append(span.name)
        span = by_id.get(span.parent_span_id or "")
    return out


def _assert_genai(spans: list[ReceivedSpan], prompt: str) -> None:
    attempt = next(s for s in spans if s.name == f"chat {MODEL}")
    assert attempt.kind == "SPAN_KIND_CLIENT"
    attrs = attempt.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.system"] == attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.response.model"]
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert "error.type" not in attrs
    decision = next(s for s in spans if s.name == "route decision")
    assert decision.attributes["switchyard.routing.chosen"] == MODEL
    assert MODEL in decision.attributes["switchyard.routing.candidates"]
    assert decision.attributes["switchyard.category"]
    # No text of the request anywhere: not its prompt, not its answer.
    for span in spans:
        assert prompt not in repr(span.attributes), span.name
        assert not {"gen_ai.input.messages", "gen_ai.output.messages"} & span.attributes.keys()


async def _assert_usage_written(sink: OtlpSink, spans: list[ReceivedSpan]) -> None:
    """The usage worker's span of the request lasts until its ledger statement, whose own
    span (one statement serves many requests) links to it."""
    usage = next(s for s in spans if s.name == "llm.usage process")
    assert usage.service == "switchyard-usage"
    assert _chain(spans, "llm.usage process")[:3] == [
        "llm.usage process", "llm.usage publish", "llm.classified process"]

    def write() -> ReceivedSpan | None:
        return next((s for s in sink.received() if s.name == "usage ledger write"
                     and (usage.trace_id, usage.span_id) in s.links), None)

    await eventually(write, timeout_s=30)


async def test_a_request_is_one_trace_across_every_process(
        sink: OtlpSink, client: openai.AsyncOpenAI) -> None:
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    messages = _prompt()
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages,  # type: ignore[arg-type]
        extra_headers={"traceparent": f"00-{client_trace}-{client_span}-01"})
    assert raw.parse().choices[0].message.content
    # The client's trace is honoured: the answer names it, and the spans are in it.
    assert raw.headers["x-trace-id"] == client_trace
    match = TRACEPARENT.match(raw.headers["traceparent"])
    assert match is not None
    assert match.group(1) == client_trace

    spans = await _trace(sink, client_trace, REQUEST_SPANS)
    _assert_connected(spans, root_parent=client_span)
    assert {s.service for s in spans} >= SERVICES
    server = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert match.group(2) == server.span_id  # the response's traceparent is the server span
    # Across Kafka: the router's consume span descends from the ingress's produce span,
    # through the classifier stage.
    assert _chain(spans, f"chat {MODEL}") == [
        f"chat {MODEL}", "llm.classified process", "llm.classified publish",
        "llm.requests process", "llm.requests publish", "POST /v1/chat/completions"]
    assert _chain(spans, "classify")[1] == "llm.requests process"
    assert {s.name: s.kind for s in spans}["llm.requests publish"] == "SPAN_KIND_PRODUCER"
    _assert_genai(spans, messages[0]["content"])
    await _assert_usage_written(sink, spans)


async def test_a_streamed_request_is_one_trace_with_its_relay(
        sink: OtlpSink, client: openai.AsyncOpenAI) -> None:
    messages = _prompt()
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=True)  # type: ignore[arg-type]
    stream = raw.parse()
    assert isinstance(stream, openai.AsyncStream)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                    if chunk.choices])
    assert text
    trace_id = raw.headers["x-trace-id"]
    assert TRACE_ID.match(trace_id)
    assert raw.headers["traceparent"].split("-")[1] == trace_id

    spans = await _trace(sink, trace_id, REQUEST_SPANS | {"reply relay"})
    _assert_connected(spans)  # no client traceparent: the ingress's span is the root
    assert _chain(spans, "reply relay") == ["reply relay", "POST /v1/chat/completions"]
    assert _chain(spans, "reply publish")[1] == "llm.classified process"
    _assert_genai(spans, messages[0]["content"])
    assert text not in repr([s.attributes for s in spans])
    await _assert_usage_written(sink, spans)


async def test_an_anthropic_messages_stream_is_one_trace_too(
        sink: OtlpSink, traced: Gateway, key: str) -> None:
    claude = anthropic.AsyncAnthropic(base_url=traced.url, api_key=key, max_retries=0,
                                      timeout=30)
    async with claude, claude.messages.stream(
            model=MODEL, max_tokens=64, messages=_prompt()) as stream:  # type: ignore[arg-type]
        assert await stream.get_final_text()
        trace_id = stream.response.headers["x-trace-id"]
    names = {"POST /v1/messages", *(REQUEST_SPANS - {"POST /v1/chat/completions"}),
             "reply relay"}
    spans = await _trace(sink, trace_id, names)
    roots = [s.name for s in spans if s.parent_span_id not in {t.span_id for t in spans}]
    assert roots == ["POST /v1/messages"]
    assert _chain(spans, "reply relay") == ["reply relay", "POST /v1/messages"]


async def test_a_responses_stream_is_one_trace_too(sink: OtlpSink,
                                                   client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model=MODEL, input="say hello") as stream:
        assert (await stream.get_final_response()).output_text
        trace_id = stream._response.headers["x-trace-id"]
    names = {"POST /v1/responses", *(REQUEST_SPANS - {"POST /v1/chat/completions"}),
             "reply relay"}
    spans = await _trace(sink, trace_id, names)
    roots = [s.name for s in spans if s.parent_span_id not in {t.span_id for t in spans}]
    assert roots == ["POST /v1/responses"]
    assert _chain(spans, "reply relay") == ["reply relay", "POST /v1/responses"]


async def test_each_attempt_is_a_span_and_logs_carry_the_trace(
        sink: OtlpSink, client: openai.AsyncOpenAI, fake: FakeAdmin, traced: Gateway) -> None:
    await fake.configure(fail_first=1)  # a 500, then the route answers: called again
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_prompt())  # type: ignore[arg-type]
    trace_id = raw.headers["x-trace-id"]
    spans = await _trace(sink, trace_id, REQUEST_SPANS)
    _assert_connected(spans)
    attempts = sorted((s for s in spans if s.name == f"chat {MODEL}"),
                      key=lambda s: s.attributes["switchyard.attempt"])
    assert [(a.attributes["switchyard.attempt"], a.attributes.get("error.type"), a.status)
            for a in attempts] == [(1, "upstream_server_error", "STATUS_CODE_ERROR"),
                                   (2, None, "STATUS_CODE_UNSET")]
    consume = next(s for s in spans if s.name == "llm.classified process")
    assert {a.parent_span_id for a in attempts} == {consume.span_id}

    # The router's line about the retry is JSON, in the request's trace and span.
    lines = [orjson.loads(line) for line in
             traced.log_file("router-0").read_text().splitlines() if line.startswith("{")]
    retry = [line for line in lines if "calling it again" in line["message"]
             and line.get("trace_id") == trace_id]
    assert retry, lines[-5:]
    assert retry[0]["process"] == "router"
    assert retry[0]["span_id"] == consume.span_id
    assert retry[0]["request_id"] == raw.headers["x-request-id"]
    assert {"ts", "level", "logger", "message"} <= retry[0].keys()


async def test_an_audited_action_is_written_in_its_requests_trace(
        sink: OtlpSink, traced: Gateway) -> None:
    pool = await asyncpg.create_pool(traced.settings.postgres.owner_dsn, min_size=1,
                                     max_size=1)
    try:
        async with platform(pool, traced) as admin:
            created = await admin.http.post(TENANTS, json={"name": f"t-{uuid.uuid4().hex}"})
    finally:
        await pool.close()
    assert created.status_code == 201, created.text
    spans = await _trace(sink, created.headers["x-trace-id"],
                         {"POST /v1/admin/tenants", "audit.events process"})
    assert _chain(spans, "audit.events process") == [
        "audit.events process", "POST /v1/admin/tenants"]
    append = next(s for s in spans if s.name == "audit.events process")
    assert append.service == "switchyard-audit"
    assert append.attributes["switchyard.audit.action"] == "tenant.created"


async def test_with_tracing_off_responses_carry_a_trace_and_nothing_is_exported(
        sink: OtlpSink, traced: Gateway, key: str, client: openai.AsyncOpenAI,
        tmp_path: Path) -> None:
    # One more ingress, on the same stack, with tracing off but an endpoint it could use.
    async with ingresses(traced, tmp_path, {"OTEL_TRACES_EXPORTER": "none",
                                            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                                            "SWITCHYARD_LOG_FORMAT": "json"}) as [url]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                                      timeout=30) as untraced:
            raw = await untraced.chat.completions.with_raw_response.create(
                model=MODEL, messages=_prompt())  # type: ignore[arg-type]
            off_trace = raw.headers["x-trace-id"]
            assert TRACE_ID.match(off_trace)
            match = TRACEPARENT.match(raw.headers["traceparent"])
            assert match is not None
            assert match.group(1) == off_trace
            # A client's trace is honoured as well.
            client_trace = secrets.token_hex(16)
            honoured = await untraced.chat.completions.with_raw_response.create(
                model=MODEL, messages=_prompt(),  # type: ignore[arg-type]
                extra_headers={"traceparent": f"00-{client_trace}-{secrets.token_hex(8)}-00"})
            assert honoured.headers["x-trace-id"] == client_trace
        # Errors too.
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-not-a-key",
                                      max_retries=0, timeout=30) as stranger:
            with pytest.raises(openai.AuthenticationError) as refused_info:
                await stranger.chat.completions.create(
                    model=MODEL, messages=_prompt())  # type: ignore[arg-type]
        headers = refused_info.value.response.headers
        assert TRACE_ID.match(headers["x-trace-id"])
        assert TRACEPARENT.match(headers["traceparent"])
    # A traced request afterwards, through the traced ingress: once its spans (the routers'
    # and the usage worker's among them) have arrived, the earlier ones would have too.
    after = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_prompt())  # type: ignore[arg-type]
    await _trace(sink, after.headers["x-trace-id"], REQUEST_SPANS)
    assert not [s.name for s in sink.received() if s.trace_id in (off_trace, client_trace)]


def test_json_log_lines_carry_the_current_trace() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("router"))
    log = logging.getLogger("tests.tracing")
    log.addHandler(handler)
    log.propagate = False
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    try:
        log.warning("outside any request")
        record: Any = type("Record", (), {"headers": [
            ("traceparent", f"00-{trace_id}-{span_id}-00".encode())],
            "topic": "llm.requests", "partition": 0, "offset": 1})()
        with Tracing().consume("llm.requests process", record, request_id="req_1"):
            log.warning("inside %s", "a request")
    finally:
        log.removeHandler(handler)
    outside, inside = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert outside["message"] == "outside any request"
    assert "trace_id" not in outside
    assert "request_id" not in outside
    assert inside == {"ts": inside["ts"], "level": "WARNING", "logger": "tests.tracing",
                      "message": "inside a request", "process": "router",
                      "trace_id": trace_id, "span_id": span_id, "request_id": "req_1"}


def test_malformed_traceparents_are_ignored() -> None:
    good = f"00-{'a' * 32}-{'b' * 16}-01"
    assert parse_traceparent(good) is not None
    for bad in ("", "garbage", f"00-{'0' * 32}-{'b' * 16}-01", f"00-{'a' * 32}-{'0' * 16}-01",
                f"ff-{'a' * 32}-{'b' * 16}-01", f"00-{'a' * 31}-{'b' * 16}-01",
                f"00-{'g' * 32}-{'b' * 16}-01", f"00-{'a' * 32}-{'b' * 16}-01-extra"):
        assert parse_traceparent(bad) is None, bad
    assert context_of(None) is None


def test_tracing_is_off_unless_an_exporter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for environ in ({}, {"OTEL_TRACES_EXPORTER": "none"},
                    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}):
        tracing = open_tracing("router", content=True, environ=environ)
        assert not tracing.on, environ
        assert not tracing.content  # nothing to record it in
        with tracing.span("anything") as span:
            assert not span.is_recording()
        tracing.close()
    with OtlpSink(keep=True) as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        on = open_tracing("router", environ={"OTEL_TRACES_EXPORTER": "otlp"})
        try:
            assert on.on
            with on.span("anything") as span:
                assert span.is_recording()
        finally:
            on.close()  # flushes: the span is exported before this returns
        assert [(s.name, s.service) for s in receiver.received()] == [
            ("anything", "switchyard-router")]
    with pytest.raises(ValueError, match="zipkin"):
        open_tracing("router", environ={"OTEL_TRACES_EXPORTER": "zipkin"})


def test_prompts_and_answers_are_recorded_only_when_the_operator_opts_in() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    model = load_catalog(Settings().catalog_path).model(MODEL)
    assert model is not None
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    for content in (False, True):
        report = Report(1, model, "openai", status="ok", text=["Hel", "lo"] if content else None,
                        response_model="gpt-4o-mini-2024-07-18", finish_reasons=["stop"])
        with Tracing(provider.get_tracer("t"), content=content).span("chat") as span:
            describe_attempt(span, report, content=content)
    plain, opted = (s.attributes or {} for s in exported.get_finished_spans())
    assert plain["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert "gen_ai.output.messages" not in plain
    assert orjson.loads(str(opted["gen_ai.output.messages"])) == [
        {"role": "assistant", "content": "Hello"}]
