"""The fake upstream's Gemini dialect must be indistinguishable from Gemini to the official
google-genai SDK: every response and every stream chunk it emits parses."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from google import genai
from google.genai import errors, types

from compose.fake_gemini import embedding_of
from compose.fake_state import FakeConfig
from compose.fake_upstream import FakeUpstream
from tests.test_fake_upstream import JUDGE_KEY, JUDGE_PROMPT, check_verdict

MODEL = "gemini-2.5-flash"
SYSTEM = "be brief"
PROMPT = "hello there world"
# (2 + 4) for the system instruction + (3 + 4) for the user turn, as the OpenAI dialect counts.
PROMPT_TOKENS = 13
TOOL = types.Tool(function_declarations=[types.FunctionDeclaration(
    name="lookup", description="Look a word up.",
    parameters_json_schema={"type": "object", "properties": {"query": {"type": "string"}},
                            "required": ["query"]})])


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeConfig(tokens=5)) as upstream:
        yield upstream


def _client(fake: FakeUpstream, api_version: str | None = "v1beta") -> genai.Client:
    # One attempt: the SDK's retries would multiply every deliberate error.
    return genai.Client(api_key="test-key", http_options=types.HttpOptions(
        base_url=fake.base_url, api_version=api_version,
        retry_options=types.HttpRetryOptions(attempts=1)))


@pytest_asyncio.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[genai.Client]:
    sdk = _client(fake)
    yield sdk
    await sdk.aio.aclose()


def _config(**kwargs: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(system_instruction=SYSTEM, **kwargs)


def _words(word: str, n: int) -> str:
    return "".join(f"{word}-{i} " for i in range(n))


async def test_generate_content(client: genai.Client, fake: FakeUpstream) -> None:
    resp = await client.aio.models.generate_content(model=MODEL, contents=PROMPT,
                                                    config=_config())
    assert resp.text == _words("hello", 5)
    assert resp.model_version == MODEL
    assert resp.response_id
    candidate = resp.candidates[0] if resp.candidates else None
    assert candidate is not None
    assert candidate.finish_reason == types.FinishReason.STOP
    assert candidate.content is not None
    assert candidate.content.role == "model"
    usage = resp.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.total_token_count) == (
        PROMPT_TOKENS, 5, PROMPT_TOKENS + 5)
    assert usage.cached_content_token_count is None  # zero counts are left out, as by Gemini
    assert fake.stats.requests_total == 1
    assert fake.stats.last_authorization == "test-key"


async def test_default_api_version_is_served(fake: FakeUpstream) -> None:
    sdk = _client(fake, api_version=None)  # google-genai 3.x calls /v1 unless told otherwise
    try:
        resp = await sdk.aio.models.generate_content(model=MODEL, contents=PROMPT)
        assert resp.text == _words("hello", 5)
    finally:
        await sdk.aio.aclose()


async def test_stream(client: genai.Client, fake: FakeUpstream) -> None:
    chunks = [c async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents=PROMPT, config=_config())]
    assert [c.text for c in chunks] == [f"hello-{i} " for i in range(5)]
    assert len({c.response_id for c in chunks}) == 1
    finishes = [c.candidates[0].finish_reason if c.candidates else None for c in chunks]
    assert finishes == [None] * 4 + [types.FinishReason.STOP]
    assert all(c.usage_metadata is None for c in chunks[:-1])
    usage = chunks[-1].usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (PROMPT_TOKENS, 5)
    assert (fake.stats.completed_streams, fake.stats.open_streams) == (1, 0)


async def test_raw_wire_format(fake: FakeUpstream) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    url = f"{fake.base_url}/v1beta/models/{MODEL}:streamGenerateContent"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, params={"alt": "sse"}, json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
        async with http.post(url, json=body) as resp:
            array = json.loads(await resp.read())
        async with http.post(f"{fake.base_url}/v1beta/models/{MODEL}:generateContent",
                             json={**body, "generation_config": {}}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    # Google ends each event with CRLF CRLF; there is no [DONE] sentinel.
    events = text.split("\r\n\r\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    parsed = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [p["candidates"][0]["content"]["parts"][0]["text"] for p in parsed] == [
        f"hi-{i} " for i in range(5)]
    assert [c["candidates"][0]["content"]["parts"][0]["text"] for c in array] == [
        f"hi-{i} " for i in range(5)]
    assert set(parsed[-1]) == {"candidates", "usageMetadata", "modelVersion", "responseId"}
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["code"] == 400
    assert 'Unknown name "generation_config"' in error["message"]


async def test_multipart_input_with_inline_image(client: genai.Client) -> None:
    content = types.Content(role="user", parts=[
        types.Part(text="multi"),
        types.Part.from_bytes(data=b"\x89PNG\r\n\x1a\n", mime_type="image/png"),
        types.Part(text="part more")])
    resp = await client.aio.models.generate_content(model=MODEL, contents=content)
    assert resp.text == _words("multipart", 5)  # a turn's texts join as in the OpenAI dialect


async def test_function_call_and_response(client: genai.Client) -> None:
    config = _config(tools=[TOOL])
    first = await client.aio.models.generate_content(model=MODEL, contents="find cats",
                                                     config=config)
    assert first.function_calls is not None
    call = first.function_calls[0]
    assert (call.name, call.args) == ("lookup", {"query": "find"})
    assert first.candidates
    assert first.candidates[0].finish_reason == types.FinishReason.STOP
    model_turn = first.candidates[0].content
    assert model_turn is not None
    assert model_turn.parts
    assert model_turn.parts[0].thought_signature  # Gemini 3 signs its function calls

    history = [types.Content(role="user", parts=[types.Part(text="find cats")]), model_turn,
               types.Content(role="user", parts=[types.Part.from_function_response(
                   name="lookup", response={"output": "3 cats"})])]
    second = await client.aio.models.generate_content(model=MODEL, contents=history,
                                                      config=config)
    assert second.function_calls is None
    assert second.text == _words("find", 5)

    # Replaying the call without its signature is refused, as Gemini 3 refuses it.
    unsigned = types.Content(role="model", parts=[types.Part.from_function_call(
        name="lookup", args={"query": "find"})])
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(
            model=MODEL, contents=[history[0], unsigned, history[2]], config=config)
    assert info.value.code == 400
    assert "thought_signature" in str(info.value.message)


async def test_function_calling_modes(client: genai.Client) -> None:
    def calling(mode: str, names: list[str] | None = None) -> types.GenerateContentConfig:
        second = types.FunctionDeclaration(name="fetch", parameters_json_schema={})
        tools = [TOOL, types.Tool(function_declarations=[second])]
        return _config(tools=tools, tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(
                mode=types.FunctionCallingConfigMode(mode), allowed_function_names=names)))

    none = await client.aio.models.generate_content(model=MODEL, contents="x y",
                                                    config=calling("NONE"))
    assert none.text == _words("x", 5)
    pinned = await client.aio.models.generate_content(model=MODEL, contents="x y",
                                                      config=calling("ANY", ["fetch"]))
    assert pinned.function_calls
    assert pinned.function_calls[0].name == "fetch"
    streamed = [c async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents="x y", config=calling("ANY"))]
    assert len(streamed) == 1  # a call arrives whole, with its finish reason and usage
    assert streamed[0].function_calls
    assert streamed[0].function_calls[0].name == "lookup"
    assert streamed[0].usage_metadata is not None


async def test_json_mode(client: genai.Client) -> None:
    config = _config(response_mime_type="application/json")
    resp = await client.aio.models.generate_content(model=MODEL, contents=PROMPT,
                                                    config=config)
    assert json.loads(resp.text or "") == {"word": "hello", "tokens": 5}
    chunks = [c async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents=PROMPT, config=config)]
    assert len(chunks) > 1
    assert json.loads("".join(c.text or "" for c in chunks)) == {"word": "hello", "tokens": 5}


async def test_usage_with_cached_tokens(client: genai.Client, fake: FakeUpstream) -> None:
    fake.configure(cached_tokens=7, prompt_tokens_override=100)
    resp = await client.aio.models.generate_content(model=MODEL, contents=PROMPT)
    usage = resp.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.cached_content_token_count,
            usage.total_token_count) == (100, 7, 105)
    assert usage.cache_tokens_details
    assert usage.cache_tokens_details[0].token_count == 7


async def test_max_output_tokens_and_logprobs(client: genai.Client) -> None:
    resp = await client.aio.models.generate_content(
        model=MODEL, contents=PROMPT,
        config=_config(max_output_tokens=2, response_logprobs=True, logprobs=2))
    assert resp.text == _words("hello", 2)
    assert resp.candidates is not None
    candidate = resp.candidates[0]
    assert candidate.finish_reason == types.FinishReason.MAX_TOKENS
    result = candidate.logprobs_result
    assert result is not None
    assert result.chosen_candidates
    assert result.top_candidates
    assert [c.token for c in result.chosen_candidates] == ["hello-0 ", "hello-1 "]
    assert [c.log_probability for c in result.chosen_candidates] == [-0.25, -0.5]
    assert [len(t.candidates or ()) for t in result.top_candidates] == [2, 2]
    assert candidate.avg_logprobs == pytest.approx(-0.375)


@pytest.mark.parametrize(("knobs", "error", "code", "status"), [
    ({"outage": True}, errors.ServerError, 503, "UNAVAILABLE"),
    ({"error_rate": 1.0, "error_status": 429}, errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
    ({"error_rate": 1.0}, errors.ServerError, 500, "INTERNAL"),
])
async def test_errors(client: genai.Client, fake: FakeUpstream, knobs: dict[str, Any],
                      error: type[errors.APIError], code: int, status: str) -> None:
    fake.configure(**knobs)
    with pytest.raises(error) as info:
        await client.aio.models.generate_content(model=MODEL, contents=PROMPT)
    assert (info.value.code, info.value.status) == (code, status)
    assert info.value.message
    assert ("overloaded" in info.value.message
                                   or "processing your request" in info.value.message)
    with pytest.raises(error) as info:  # the SDK's stream raises when first iterated
        await anext(aiter(await client.aio.models.generate_content_stream(model=MODEL,
                                                                          contents=PROMPT)))
    assert info.value.code == code
    assert fake.stats.errors_sent == 2


async def test_bad_request_is_a_client_error(client: genai.Client, fake: FakeUpstream) -> None:
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(
            model=MODEL, contents=PROMPT,
            config=_config(http_options=types.HttpOptions(
                headers={"x-fake-config": '{"tokns": 1}'})))
    assert (info.value.code, info.value.status) == (400, "INVALID_ARGUMENT")
    assert "x-fake-config" in str(info.value.message)


async def test_stream_cut_mid_answer_raises(client: genai.Client, fake: FakeUpstream) -> None:
    fake.configure(cut_after_tokens=2)
    received: list[str] = []

    async def drain() -> None:
        async for chunk in await client.aio.models.generate_content_stream(
                model=MODEL, contents=PROMPT):
            received.append(chunk.text or "")

    # The chunks before the cut arrive; then the truncated chunked body fails the read.
    with pytest.raises(aiohttp.ClientPayloadError):
        await drain()
    assert received == ["hello-0 ", "hello-1 "]
    assert (fake.stats.cut_streams, fake.stats.completed_streams) == (1, 0)


async def test_latency_knobs(client: genai.Client, fake: FakeUpstream) -> None:
    fake.configure(ttft_ms=150, inter_token_ms=50, tokens=3)
    start = time.monotonic()
    stream = await client.aio.models.generate_content_stream(model=MODEL, contents=PROMPT)
    arrivals = []
    async for _ in stream:
        arrivals.append(time.monotonic() - start)
    assert arrivals[0] >= 0.15
    assert arrivals[2] - arrivals[0] >= 0.09


# google-genai keeps a stream's aiohttp response in a reference cycle (its HttpResponse holds
# the generator that reads it), so a stream left before its end gives its connection back only
# when the cyclic GC finds it, and aiohttp warns then. Leaving the stream is this test's point:
# the cycle is collected here, and only here that warning is expected.
@pytest.mark.filterwarnings("ignore:Unclosed connection:ResourceWarning:aiohttp.connector")
async def test_disconnect_is_counted(fake: FakeUpstream) -> None:
    sdk = _client(fake)
    fake.configure(inter_token_ms=2000)
    stream = await sdk.aio.models.generate_content_stream(model=MODEL, contents=PROMPT)
    assert isinstance(stream, AsyncGenerator)
    await anext(stream)
    assert fake.stats.open_streams == 1
    await stream.aclose()
    await sdk.aio.aclose()  # the SDK's pool holds the socket until the client closes
    # The server sleeps 2 s before its next write, so only prompt detection passes.
    deadline = time.monotonic() + 1.0
    while fake.stats.disconnects == 0:
        if time.monotonic() > deadline:
            raise AssertionError("the disconnect was not noticed in time")
        await asyncio.sleep(0.01)
    assert (fake.stats.disconnects, fake.stats.open_streams) == (1, 0)
    assert fake.stats.completed_streams == 0
    gc.collect()


async def test_embeddings(client: genai.Client, fake: FakeUpstream) -> None:
    resp = await client.aio.models.embed_content(model="gemini-embedding-001",
                                                 contents=["alpha", "beta gamma"])
    assert resp.embeddings is not None
    assert [e.values for e in resp.embeddings] == [embedding_of("alpha"),
                                                  embedding_of("beta gamma")]
    assert resp.usage_metadata is None  # like Gemini's batch embeddings: no usage reported
    short = await client.aio.models.embed_content(
        model="gemini-embedding-001", contents="alpha",
        config=types.EmbedContentConfig(output_dimensionality=4))
    assert short.embeddings
    assert short.embeddings[0].values == embedding_of("alpha", 4)
    assert embedding_of("alpha", 4) == embedding_of("alpha")[:4]
    assert all(-1.0 <= v <= 1.0 for v in embedding_of("alpha", 100))
    fake.configure(outage=True)
    with pytest.raises(errors.ServerError):
        await client.aio.models.embed_content(model="gemini-embedding-001", contents="x")


async def test_per_model_judge_and_answer(client: genai.Client, fake: FakeUpstream) -> None:
    # The model comes from the URL path: one fake hosts a judge, a fixed answer, a broken model.
    fake.configure(per_model={"gemini-judge": {"judge_key": JUDGE_KEY},
                              "gemini-fixed": {"answer": "Paris, of course."},
                              "gemini-broken": {"error_rate": 1, "error_status": 429}})
    resp = await client.aio.models.generate_content(
        model="gemini-judge", contents=JUDGE_PROMPT,
        config=_config(response_mime_type="application/json"))
    check_verdict(resp.text or "")
    chunks = [c.text or "" async for c in await client.aio.models.generate_content_stream(
        model="gemini-judge", contents=JUDGE_PROMPT)]
    assert len(chunks) > 3
    check_verdict("".join(chunks))
    chunks = [c.text or "" async for c in await client.aio.models.generate_content_stream(
        model="gemini-fixed", contents=PROMPT)]
    assert chunks == ["Paris, ", "of ", "course."]
    resp = await client.aio.models.generate_content(model="gemini-fixed", contents=PROMPT)
    assert resp.text == "Paris, of course."
    assert resp.usage_metadata is not None
    assert resp.usage_metadata.candidates_token_count == 3
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model="gemini-broken", contents=PROMPT)
    assert info.value.code == 429
    resp = await client.aio.models.generate_content(model=MODEL, contents=PROMPT)
    assert resp.text == _words("hello", 5)
    await client.aio.models.embed_content(model="gemini-embedding-001", contents="x")
    assert fake.stats.calls_by_model == {"gemini-judge": 2, "gemini-fixed": 2,
                                         "gemini-broken": 1, MODEL: 1,
                                         "gemini-embedding-001": 1}
