"""The fake upstream's Gemini dialect: `generateContent`, `streamGenerateContent` (SSE with
`alt=sse`, else one streamed JSON array), `batchEmbedContents` and `embedContent`, in
Google's wire format so the official `google-genai` SDK parses every answer.

Answers come from `fake_scenario`, so one set of knobs predicts them in every dialect. Like
Gemini, the fake is strict about the request: an unknown field of the request, its
generationConfig, a part or an embed request is a 400 (as Google's proto JSON parser makes
it), and a replayed function call of the current turn must carry its thought signature (as
Gemini 3 requires), so a translation that gets either wrong fails here, not in production."""

from __future__ import annotations

import base64
import hashlib
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

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
           500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
           504: "DEADLINE_EXCEEDED"}
_REQUEST_FIELDS = frozenset({"contents", "systemInstruction", "tools", "toolConfig",
                             "safetySettings", "generationConfig", "cachedContent"})
_GENERATION_FIELDS = frozenset({
    "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
    "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
    "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
    "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "imageConfig",
    "mediaResolution"})
_PART_FIELDS = frozenset({"text", "inlineData", "fileData", "functionCall", "functionResponse",
                          "executableCode", "codeExecutionResult", "thought",
                          "thoughtSignature", "videoMetadata", "mediaResolution"})
_EMBED_FIELDS = frozenset({"model", "content", "taskType", "title", "outputDimensionality"})
_EMBED_DIMENSIONS = 8  # short vectors keep test output readable; outputDimensionality wins


class _BadRequest(ValueError):
    """A request Gemini would refuse with 400 INVALID_ARGUMENT."""


def add_routes(app: web.Application) -> None:
    # aiohttp cannot put a literal ':' after a path variable, so the method is split off here.
    # v1beta is what the adapter calls; v1 is where google-genai 3.x goes by default.
    for version in ("v1beta", "v1"):
        app.router.add_post(f"/{version}/models/{{tail}}", _dispatch)


async def _dispatch(request: web.Request) -> web.StreamResponse:
    model, _, method = request.match_info["tail"].rpartition(":")
    if method in ("generateContent", "streamGenerateContent"):
        return await _generate(request, model, stream=method == "streamGenerateContent")
    if method in ("batchEmbedContents", "embedContent"):
        return await _embed(request, model, batch=method == "batchEmbedContents")
    return _error(404, f"Method {method!r} is not found for models/{model}.")


def _error(status: int, message: str) -> web.Response:
    name = _STATUS.get(status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if status == 429:  # Google says when to come back
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": "1s"}]
    return web.Response(status=status, body=orjson.dumps({"error": error}),
                        content_type="application/json")


async def _admitted(request: web.Request, model: str
                    ) -> tuple[FakeConfig, FakeStats, dict[str, Any]] | web.StreamResponse:
    """The call counted and admitted (or its injected failure), and its JSON body."""
    admitted = admit(request, model)
    if isinstance(admitted, Failure):
        return await fail(request, request.app[STATE_KEY].stats, admitted,
                          lambda f: _error(f.status, f.message))
    cfg, stats = admitted
    try:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            raise _BadRequest("Invalid JSON payload received. Expected an object.")
    except (orjson.JSONDecodeError, _BadRequest) as exc:
        stats.errors_sent += 1
        return _error(400, str(exc))
    return cfg, stats, body


async def _generate(request: web.Request, model: str, stream: bool) -> web.StreamResponse:
    admitted = await _admitted(request, model)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    cfg, stats, body = admitted
    try:
        ask = _ask(body)
    except _BadRequest as exc:
        stats.errors_sent += 1
        return _error(400, str(exc))
    if (failure := failing(request, cfg, stats, model)) is not None:
        return await fail(request, stats, failure, lambda f: _error(f.status, f.message))
    answer = plan(cfg, ask)
    if (refusal := refusing(request, cfg, stats, ask, answer, "gemini")) is not None:
        return await fail(request, stats, refusal, lambda f: _error(f.status, f.message))
    gen = body.get("generationConfig") or {}
    top = int(gen.get("logprobs") or 0) if gen.get("responseLogprobs") else None
    meta = {"modelVersion": model, "responseId": uuid.uuid4().hex[:22]}
    if stream:
        return await _stream(request, stats, cfg, answer, meta, top)
    if not await answer_ready(request, stats, cfg):
        return web.Response(status=499)
    candidate = _candidate(answer, _pieces(answer), last=True, top=top)
    candidate["index"] = 0
    if top is not None:
        chosen = candidate["logprobsResult"]["chosenCandidates"]
        candidate["avgLogprobs"] = sum(c["logProbability"] for c in chosen) / max(len(chosen), 1)
    payload = {"candidates": [candidate], "usageMetadata": _usage(answer), **meta}
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _ask(body: dict[str, Any]) -> Ask:
    """What decides the answer; raises _BadRequest for what Gemini would refuse."""
    _known(body, _REQUEST_FIELDS, "GenerateContentRequest")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _BadRequest("* GenerateContentRequest.contents: contents is not specified")
    texts, last_user, turn = [], "", 0
    if (system := body.get("systemInstruction")) is not None:
        texts.append(_text(_parts(system, "system_instruction")))
    for i, content in enumerate(contents):
        parts = _parts(content, f"contents[{i}]")
        role = content.get("role", "user")
        if role not in ("user", "model"):
            raise _BadRequest(f"* contents[{i}].role: Please use a valid role: user, model.")
        texts.append(_text(parts))
        if role == "user" and not all("functionResponse" in p for p in parts):
            last_user, turn = _text(parts), i  # the user's words open the current turn
    for content in contents[turn:]:
        calls = [p for p in content["parts"] if "functionCall" in p]
        if content.get("role") == "model" and calls and not calls[0].get("thoughtSignature"):
            raise _BadRequest("Function call is missing a thought_signature in functionCall "
                              "parts. This is required for tools to work correctly.")
    gen = body.get("generationConfig") or {}
    _known(gen, _GENERATION_FIELDS, "generation_config")
    tools = [str(d.get("name")) for tool in body.get("tools") or ()
             for d in tool.get("functionDeclarations") or ()]
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    allowed = calling.get("allowedFunctionNames") or []
    choice = {"NONE": "none", "ANY": "required"}.get(calling.get("mode", "AUTO"))
    if len(allowed) == 1 and choice != "none":
        choice = str(allowed[0])
    limit = gen.get("maxOutputTokens")
    return Ask(last_user_text=last_user, all_texts=texts, tools=tools, tool_choice=choice,
               json_mode=gen.get("responseMimeType") == "application/json",
               max_tokens=int(limit) if limit is not None else None,
               after_tool_result=any("functionResponse" in p for p in contents[-1]["parts"]),
               prefill=contents[-1].get("role") == "model")


def _known(obj: dict[str, Any], fields: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in fields:
            raise _BadRequest(f'Invalid JSON payload received. Unknown name "{key}" at '
                              f"'{where}': Cannot find field.")


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        raise _BadRequest(f"* {where}.parts: contents.parts must not be empty.")
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not part:
            raise _BadRequest(f"* {where}.parts[{j}]: required oneof field 'data' is empty")
        _known(part, _PART_FIELDS, f"{where}.parts[{j}]")
        if "functionResponse" in part:
            response = part["functionResponse"]
            if not response.get("name") or not isinstance(response.get("response"), dict):
                raise _BadRequest(f"* {where}.parts[{j}].function_response: name and "
                                  "response (an object) are required")
        if "functionCall" in part and not isinstance(part["functionCall"].get("args", {}),
                                                     dict):
            raise _BadRequest(f"* {where}.parts[{j}].function_call.args: must be an object")
    return parts


def _text(parts: list[dict[str, Any]]) -> str:
    # Joined without separators, as the OpenAI dialect joins a message's text parts.
    return "".join(p["text"] for p in parts if isinstance(p.get("text"), str))


def _pieces(answer: Plan) -> list[str]:
    # Gemini sends a function call whole, never as argument fragments.
    return [answer.text] if answer.kind == "tool_call" else answer.pieces


def _signature(name: str | None) -> str:
    return base64.b64encode(f"fake-thought-signature:{name}".encode()).decode()


def _candidate(answer: Plan, pieces: list[str], last: bool, top: int | None,
               offset: int = 0) -> dict[str, Any]:
    """One candidate carrying `pieces`; the last one of an answer carries its finishReason."""
    part: dict[str, Any]
    if answer.kind == "tool_call":
        part = {"functionCall": {"name": answer.tool_name, "args": orjson.loads(answer.text)},
                "thoughtSignature": _signature(answer.tool_name)}
    else:
        part = {"text": "".join(pieces)}
    candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}}
    if last:
        candidate["finishReason"] = "MAX_TOKENS" if answer.finish == "length" else "STOP"
    if top is not None and answer.kind != "tool_call":
        chosen: list[dict[str, Any]] = [
            {"token": p, "logProbability": -0.25 * ((offset + i) % 4 + 1)}
            for i, p in enumerate(pieces)]
        result: dict[str, Any] = {"chosenCandidates": chosen}
        if top > 0:
            result["topCandidates"] = [{"candidates": [c] + [
                {"token": f"alt{k}", "logProbability": c["logProbability"] - k}
                for k in range(1, top)]} for c in chosen]
        candidate["logprobsResult"] = result
    return candidate


def _usage(answer: Plan) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "promptTokenCount": answer.prompt_tokens,
        "candidatesTokenCount": answer.completion_tokens,
        "totalTokenCount": answer.prompt_tokens + answer.completion_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}]}
    if answer.cached_tokens:  # proto3 JSON leaves zero counts out, and so does Gemini
        usage["cachedContentTokenCount"] = answer.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": answer.cached_tokens}]
    return usage


async def _stream(request: web.Request, stats: FakeStats, cfg: FakeConfig, answer: Plan,
                  meta: dict[str, str], top: int | None) -> web.StreamResponse:
    sse = request.query.get("alt") == "sse"
    pieces = _pieces(answer) or [""]  # an empty answer still has its one final chunk
    events = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunk: dict[str, Any] = {
            "candidates": [_candidate(answer, [piece], last, top, offset=i)], **meta}
        if last:
            chunk["usageMetadata"] = _usage(answer)
        data = orjson.dumps(chunk)
        # SSE events end in CRLF CRLF as Google sends them; without alt=sse, a JSON array.
        events.append(b"data: " + data + b"\r\n\r\n" if sse
                      else (b"[" if i == 0 else b",\r\n") + data)
    resp = web.StreamResponse(headers=_SSE_HEADERS if sse else {
        "Content-Type": "application/json; charset=UTF-8"})
    return await send_stream(request, resp, stats, cfg, [], events, [] if sse else [b"]"])


async def _embed(request: web.Request, model: str, batch: bool) -> web.StreamResponse:
    admitted = await _admitted(request, model)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    cfg, stats, body = admitted
    try:
        if batch:
            _known(body, frozenset({"requests"}), "BatchEmbedContentsRequest")
        requests = body.get("requests") if batch else [body]
        if not isinstance(requests, list) or not requests:
            raise _BadRequest("* BatchEmbedContentsRequest.requests: requests is required")
        vectors = [_embedding(r, model, f"requests[{i}]") for i, r in enumerate(requests)]
    except _BadRequest as exc:
        stats.errors_sent += 1
        return _error(400, str(exc))
    if not await answer_ready(request, stats, cfg):
        return web.Response(status=499)
    # Like Gemini's own embedding endpoints, no usage is reported.
    payload = ({"embeddings": [{"values": v} for v in vectors]} if batch
               else {"embedding": {"values": vectors[0]}})
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _embedding(req: Any, model: str, where: str) -> list[float]:
    if not isinstance(req, dict):
        raise _BadRequest(f"* {where}: must be an object")
    _known(req, _EMBED_FIELDS, where)
    if req.get("model", f"models/{model}") != f"models/{model}":
        raise _BadRequest(f"* {where}.model: the model in each request must match "
                          f"BatchEmbedContentsRequest.model (models/{model})")
    text = _text(_parts(req.get("content"), f"{where}.content"))
    return embedding_of(text, int(req.get("outputDimensionality") or _EMBED_DIMENSIONS))


def embedding_of(text: str, dimensions: int = _EMBED_DIMENSIONS) -> list[float]:
    """The fake's vector for `text`: values in [-1, 1] from a hash, so tests can predict it."""
    stream = b""
    while len(stream) < dimensions:
        stream += hashlib.sha256(stream[-32:] + text.encode()).digest()
    return [round((b - 127.5) / 127.5, 6) for b in stream[:dimensions]]
