"""The official `openai` SDK, pointed at Switchyard, on routes that speak other dialects:
text, streams, tools in both directions and JSON mode come back OpenAI-shaped."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest

from compose.fake_upstream import expected_content
from tests.conftest import FakeAdmin

# One model per non-OpenAI dialect, with its catalog prices (input, cached input, output).
ROUTES = {
    "claude-haiku-4-5": ("anthropic", Decimal("1.00"), Decimal("0.10"), Decimal("5.00")),
    "gemini-2.5-flash": ("gemini", Decimal("0.30"), Decimal("0.03"), Decimal("2.50")),
}
MODELS = pytest.mark.parametrize("model", sorted(ROUTES))

TOOLS: Any = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                   "required": ["query"]}}}]


def ask(word: str) -> Any:
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": f"{word} and more"}]


@MODELS
async def test_text_answer(client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=7)
    completion = await client.chat.completions.create(model=model, messages=ask("tango"))
    assert completion.choices[0].message.content == expected_content(ask("tango"), 7)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.metadata is not None
    assert completion.metadata["provider"] == ROUTES[model][0]


@MODELS
async def test_stream_with_usage_and_exact_cost(client: openai.AsyncOpenAI, fake: FakeAdmin,
                                                model: str) -> None:
    await fake.configure(tokens=9, prompt_tokens_override=500, cached_tokens=200)
    stream = await client.chat.completions.create(
        model=model, messages=ask("uniform"), stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_content(ask("uniform"), 9)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
            usage.completion_tokens) == (500, 200, 9)
    _, price_in, price_cached, price_out = ROUTES[model]
    expected = (300 * price_in + 200 * price_cached + 9 * price_out) / 10**6
    metadata = (chunks[-1].model_extra or {})["metadata"]
    assert Decimal(metadata["cost_usd_exact"]) == expected
    assert metadata["cost_usd"] == float(expected)  # a JSON number with the same digits


@MODELS
async def test_the_model_calls_a_tool(client: openai.AsyncOpenAI, fake: FakeAdmin,
                                      model: str) -> None:
    completion = await client.chat.completions.create(
        model=model, messages=ask("victor"), tools=TOOLS, tool_choice="auto")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "lookup"
    assert orjson.loads(call.function.arguments) == {"query": "victor"}


@MODELS
async def test_a_streamed_tool_call_assembles_to_valid_arguments(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    stream = await client.chat.completions.create(
        model=model, messages=ask("whiskey"), tools=TOOLS, stream=True)
    deltas = [tc for c in [chunk async for chunk in stream] if c.choices
              for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function is not None
    assert deltas[0].function.name == "lookup"
    assert deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert orjson.loads(arguments) == {"query": "whiskey"}


@MODELS
async def test_a_tool_result_goes_back_and_the_model_answers(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=4)
    first = await client.chat.completions.create(model=model, messages=ask("xray"),
                                                 tools=TOOLS)
    calls = first.choices[0].message.tool_calls
    assert calls is not None
    call: Any = calls[0]
    history = [*ask("xray"),
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.id, "type": "function",
                    "function": {"name": call.function.name,
                                 "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "xray: a kind of ray"}]
    second = await client.chat.completions.create(model=model, messages=history, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == expected_content(ask("xray"), 4)


@MODELS
@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"word": {"type": "string"}},
        "additionalProperties": False}}},
])
async def test_json_mode_answers_a_json_object(client: openai.AsyncOpenAI, fake: FakeAdmin,
                                               model: str, response_format: Any) -> None:
    completion = await client.chat.completions.create(
        model=model, messages=ask("yankee"), response_format=response_format)
    content = completion.choices[0].message.content
    assert content is not None
    assert isinstance(orjson.loads(content), dict)
    assert completion.choices[0].finish_reason == "stop"


@MODELS
async def test_a_provider_outage_is_a_retryable_503(client: openai.AsyncOpenAI,
                                                     fake: FakeAdmin, model: str) -> None:
    await fake.configure(outage=True)
    with pytest.raises(openai.APIStatusError) as failure:
        await client.chat.completions.create(model=model, messages=ask("zulu"))
    assert (failure.value.status_code, failure.value.code) == (503, "upstream_overloaded")


@MODELS
async def test_a_parameter_the_provider_cannot_honour_is_a_400_naming_both(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        await client.chat.completions.create(model=model, messages=ask("alfa"),
                                             logit_bias={"50256": -100})
    assert failure.value.code == "unsupported_parameter"
    body: Any = failure.value.body
    assert body["param"] == "logit_bias"
    assert ROUTES[model][0] in failure.value.message
