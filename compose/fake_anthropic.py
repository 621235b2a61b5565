"""The fake upstream's Anthropic Messages dialect: ``POST /v1/messages``.

It speaks the real wire format (``message`` objects; named SSE events message_start →
content_block_start → ping → content_block_delta… → content_block_stop → message_delta →
message_stop; ``{"type": "error", "error": {...}}`` bodies) so the official ``anthropic`` SDK
parses it. What it answers is decided by `fake_scenario`, like every dialect of the fake:

- ``Ask.last_user_text`` is the text of the last user turn that has text (a turn holding only
  tool results does not count, as a ``tool`` message does not in Chat Completions);
  ``Ask.all_texts`` is the system prompt's text blocks, then every text block and tool-result
  text of every turn.
- a ``tool_call`` plan becomes one ``tool_use`` block (id ``toolu_`` + the plan's id after its
  ``call_`` prefix) and stop_reason ``tool_use``; a ``json`` plan (asked for with
  ``output_config.format``) becomes a text block holding the document.
- usage: ``input_tokens`` = prompt − cached, ``cache_read_input_tokens`` = cached.
- failures: outage → 529 ``overloaded_error``; others keep their status, typed as the API
  types them (429 ``rate_limit_error``, 500 ``api_error``, 400 ``invalid_request_error``…).

Like the API it requires the ``anthropic-version`` header, and under version 2026-10-21 it
refuses ``temperature`` / ``top_p`` / ``top_k``, which that version removed."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from compose.fake_scenario import (
    Ask,
    Failure,
    Plan,
    admit,
    answer_ready,
    fail,
    failing,
    plan,
    refusing,
    send_stream,
)
from compose.fake_state import STATE_KEY, FakeConfig, FakeStats

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_call": "tool_use"}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error",
               402: "billing_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
_NO_SAMPLING_VERSION = "2026-10-21"
_SAMPLING = ("temperature", "top_p", "top_k")
_NOT_JSON = object()


class _BadRequest(Exception):
    pass


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", _messages)


def _error(status: int, message: str) -> web.Response:
    etype = _ERROR_TYPE.get(status) or ("api_error" if status >= 500
                                        else "invalid_request_error")
    rid = f"req_{uuid.uuid4().hex[:24]}"
    body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": rid}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers={"request-id": rid})


def _failure(failure: Failure) -> web.Response:
    # Anthropic reports overload as 529, not the 503 other dialects use.
    return _error(529 if failure.kind == "overloaded" else failure.status, failure.message)


async def _messages(request: web.Request) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = _NOT_JSON  # refused below, once the call is counted like any other
    model = body.get("model") if isinstance(body, dict) else None
    admitted = admit(request, model if isinstance(model, str) else None)
    if isinstance(admitted, Failure):
        return await fail(request, request.app[STATE_KEY].stats, admitted, _failure)
    cfg, stats = admitted
    stats.last_anthropic = {"anthropic-version": request.headers.get("anthropic-version"),
                            "anthropic-beta": request.headers.get("anthropic-beta"),
                            "body": None if body is _NOT_JSON else body}
    try:
        if body is _NOT_JSON:
            raise _BadRequest("The request body is not valid JSON.")
        ask = _ask(request, body)
    except _BadRequest as exc:
        stats.errors_sent += 1
        return _error(400, str(exc))
    if (failure := failing(request, cfg, stats, str(body["model"]))) is not None:
        return await fail(request, stats, failure, _failure)
    answer = plan(cfg, ask)
    if (refusal := refusing(request, cfg, stats, ask, answer, "anthropic")) is not None:
        return await fail(request, stats, refusal, _failure)
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    message = _message(mid, body["model"], answer)
    if body.get("stream"):
        return await _stream(request, stats, cfg, answer, message)
    if not await answer_ready(request, stats, cfg):
        return web.Response(status=499)
    return web.Response(body=orjson.dumps(message), content_type="application/json",
                        headers={"request-id": f"req_{mid[4:]}"})


def _texts(content: object, where: str) -> tuple[list[str], list[str], bool]:
    """(text blocks, tool-result texts, whether a tool result is present) of one turn."""
    if isinstance(content, str):
        return [content], [], False
    if not isinstance(content, list):
        raise _BadRequest(f"{where}.content: Input should be a valid string or list")
    texts: list[str] = []
    results: list[str] = []
    has_result = False
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind is None:
            raise _BadRequest(f"{where}.content.{j}: each block needs a type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_result":
            has_result = True
            inner = block.get("content", "")
            results.extend(_texts(inner, f"{where}.content.{j}")[0] if inner else [])
    return texts, results, has_result


def _ask(request: web.Request, body: object) -> Ask:
    if "anthropic-version" not in request.headers:
        raise _BadRequest("anthropic-version: header is required")
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    messages, model, max_tokens = body.get("messages"), body.get("model"), body.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise _BadRequest("model: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise _BadRequest("max_tokens: Field required")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages: at least one message is required")
    if request.headers["anthropic-version"] == _NO_SAMPLING_VERSION:
        for name in _SAMPLING:
            if name in body:
                raise _BadRequest(f"{name}: is not supported in API version "
                                  f"{_NO_SAMPLING_VERSION}")
    system = body.get("system")
    all_texts = _texts(system, "system")[0] if system else []
    last_user, after_result = "", False
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("user", "assistant"):
            raise _BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        texts, results, has_result = _texts(msg.get("content"), f"messages.{i}")
        all_texts.extend(texts + results)
        if role == "user" and texts:
            last_user = "".join(texts)
        after_result = role == "user" and has_result
    tools = [t["name"] for t in body.get("tools") or []
             if isinstance(t, dict) and isinstance(t.get("name"), str)]
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    tool_choice = choice.get("name") if kind == "tool" else kind
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format")
    json_mode = isinstance(fmt, dict) and fmt.get("type") == "json_schema"
    return Ask(last_user_text=last_user, all_texts=all_texts, tools=tools,
               tool_choice=tool_choice, json_mode=json_mode, max_tokens=max_tokens,
               after_tool_result=after_result,
               prefill=isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant")


def _tool_id(answer: Plan) -> str:
    return "toolu_" + (answer.tool_call_id or "").removeprefix("call_")


def _usage(answer: Plan) -> dict[str, Any]:
    return {"input_tokens": answer.prompt_tokens - answer.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": answer.cached_tokens,
            "output_tokens": answer.completion_tokens, "service_tier": "standard"}


def _message(mid: str, model: str, answer: Plan) -> dict[str, Any]:
    block: dict[str, Any]
    if answer.kind == "tool_call":
        block = {"type": "tool_use", "id": _tool_id(answer), "name": answer.tool_name,
                 "input": orjson.loads(answer.text)}
    else:
        block = {"type": "text", "text": answer.text}
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": _STOP[answer.finish], "stop_sequence": None,
            "usage": _usage(answer)}


def _event(data: dict[str, Any]) -> bytes:
    name = str(data["type"]).encode()
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _stream(request: web.Request, stats: FakeStats, cfg: FakeConfig, answer: Plan,
                  message: dict[str, Any]) -> web.StreamResponse:
    usage = message["usage"]
    # message_start carries an empty message; output so far is at most the first token.
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": min(1, answer.completion_tokens)}}
    tool = answer.kind == "tool_call"
    block: dict[str, Any] = {"type": "text", "text": ""}
    if tool:
        block = {"type": "tool_use", "id": _tool_id(answer), "name": answer.tool_name,
                 "input": {}}
    pending = [_event({"type": "message_start", "message": start}),
               _event({"type": "content_block_start", "index": 0, "content_block": block}),
               _event({"type": "ping"})]
    if tool:  # the API opens every tool input with an empty fragment
        pending.append(_delta({"type": "input_json_delta", "partial_json": ""}))
    pieces = [_delta({"type": "input_json_delta", "partial_json": piece} if tool
                     else {"type": "text_delta", "text": piece}) for piece in answer.pieces]
    closing = [
        _event({"type": "content_block_stop", "index": 0}),
        # Usage on message_delta is cumulative, so it repeats the input counts.
        _event({"type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {k: v for k, v in usage.items() if k != "service_tier"}}),
        _event({"type": "message_stop"})]
    resp = web.StreamResponse(headers={**_SSE_HEADERS, "request-id": f"req_{message['id'][4:]}"})
    return await send_stream(request, resp, stats, cfg, pending, pieces, closing)


def _delta(delta: dict[str, Any]) -> bytes:
    return _event({"type": "content_block_delta", "index": 0, "delta": delta})
