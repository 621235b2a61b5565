"""Google Gemini: `generateContent`, `streamGenerateContent?alt=sse` and `batchEmbedContents`,
spoken as OpenAI Chat Completions and Embeddings.

The request translation lives in `gemini_translate`; this module sends it and translates the
answer back: text parts become `content` (thought parts never do), `functionCall` parts become
`tool_calls` with stable ids, each candidate becomes a choice (so `n` maps to
`candidateCount`), and `usageMetadata` becomes OpenAI usage, thoughts counted as completion."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from topics.errors import InvalidRequest, SwitchyardError, UpstreamError
from workers.providers.base import (
    MalformedEvents,
    MalformedHook,
    Route,
    Usage,
    provider_answer,
    provider_events,
)
from workers.providers.errors import (
    Kind,
    kind_of_status,
    provider_error,
    refine_bad_request,
    stream_cut,
    timed_out,
    unsupported,
)
from workers.providers.gemini_translate import make_call_id, to_gemini

_CONTENT_FILTER = ("SAFETY", "RECITATION", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT",
                   "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
                   "MODEL_ARMOR", "ESCALATION")
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "CONTINUATION": "length",
           **dict.fromkeys(_CONTENT_FILTER, "content_filter")}  # any other reason: "stop"
# Finish reasons that mean the answer is unusable, not finished: reported as errors.
_FAILED = {"MALFORMED_FUNCTION_CALL": Kind.SERVER_ERROR, "UNEXPECTED_TOOL_CALL": Kind.SERVER_ERROR,
           "MALFORMED_RESPONSE": Kind.SERVER_ERROR, "MISSING_THOUGHT_SIGNATURE": Kind.BAD_REQUEST,
           "PUP_LIMITED_DISABLED": Kind.AUTH}
# google.rpc.Code names, as Google error bodies spell them in `status`.
_STATUS_KIND = {
    "INVALID_ARGUMENT": Kind.BAD_REQUEST, "OUT_OF_RANGE": Kind.BAD_REQUEST,
    "NOT_FOUND": Kind.BAD_REQUEST, "ALREADY_EXISTS": Kind.BAD_REQUEST,
    "UNIMPLEMENTED": Kind.BAD_REQUEST,
    # Free tier unavailable in the region, billing off: our account's problem, not the caller's.
    "FAILED_PRECONDITION": Kind.AUTH,
    "PERMISSION_DENIED": Kind.AUTH, "UNAUTHENTICATED": Kind.AUTH,
    "RESOURCE_EXHAUSTED": Kind.RATE_LIMITED, "UNAVAILABLE": Kind.OVERLOADED,
    "ABORTED": Kind.OVERLOADED, "DEADLINE_EXCEEDED": Kind.TIMEOUT,
    "INTERNAL": Kind.SERVER_ERROR, "UNKNOWN": Kind.SERVER_ERROR, "DATA_LOSS": Kind.SERVER_ERROR,
    "CANCELLED": Kind.SERVER_ERROR,
}
_EMBED_PARAMS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
_EMBED_BATCH = 100  # the most requests batchEmbedContents takes at once


class GeminiGenerateContent:
    def __init__(self, session: aiohttp.ClientSession,
                 on_malformed: MalformedHook | None = None) -> None:
        self._session = session
        self._on_malformed = on_malformed

    async def complete(self, route: Route, body: dict[str, Any],
                       request_id: str) -> dict[str, Any]:
        payload = to_gemini(route.provider, body)
        data = await self._call(route, "generateContent", payload, request_id)
        return completion(route, data, request_id)

    async def stream(self, route: Route, body: dict[str, Any],
                     request_id: str) -> AsyncGenerator[dict[str, Any], None]:
        payload = to_gemini(route.provider, body)
        translator = ChunkTranslator(route, request_id)
        events = MalformedEvents(route.provider, request_id, self._on_malformed)
        async for event in provider_events(
                route, lambda: self._post(route, "streamGenerateContent?alt=sse", payload,
                                          request_id), http_error):
            data = events.parse(event.data)
            if data is None:
                continue
            for chunk in translator.feed(_checked(route.provider, data)):
                yield chunk
        yield translator.finish()  # Gemini has no [DONE]: the body's end is the stream's end

    async def embed(self, route: Route, body: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        """An OpenAI embeddings response for an OpenAI embeddings request. Gemini's batch
        embedding API documents no token usage: when none comes, usage is estimated and the
        result says `usage_estimated: true` (the router bills with it either way)."""
        texts, dimensions, as_base64 = embedding_request(route.provider, body)
        model = _model_path(route.upstream_model)
        vectors: list[list[float]] = []
        reported: list[int] = []
        try:
            async with asyncio.timeout(route.timeouts.total_s):
                for start in range(0, len(texts), _EMBED_BATCH):
                    extra = {} if dimensions is None else {"outputDimensionality": dimensions}
                    requests = [{"model": model, "content": {"parts": [{"text": t}]}, **extra}
                                for t in texts[start:start + _EMBED_BATCH]]
                    data = await self._call(route, "batchEmbedContents",
                                            {"requests": requests}, request_id)
                    vectors += [[float(v) for v in e.get("values") or ()]
                                for e in data.get("embeddings") or ()]
                    if (meta := data.get("usageMetadata")) and "promptTokenCount" in meta:
                        reported.append(int(meta["promptTokenCount"]))
        except TimeoutError as exc:
            raise timed_out(route.provider, "answer") from exc
        if len(vectors) != len(texts):
            raise UpstreamError(f"{route.provider} returned {len(vectors)} embeddings for "
                                f"{len(texts)} inputs", code="upstream_bad_response")
        estimated = len(reported) < -(-len(texts) // _EMBED_BATCH)  # some batch said nothing
        # About four characters a token, the rule of thumb Google gives for its tokenizer.
        tokens = sum(max(1, -(-len(t) // 4)) for t in texts) if estimated else sum(reported)
        return {"object": "list", "model": route.upstream_model,
                "data": [{"object": "embedding", "index": i,
                          "embedding": _b64(v) if as_base64 else v}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "usage_estimated": estimated}

    async def _call(self, route: Route, method: str, payload: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        raw = await provider_answer(
            route, lambda: self._post(route, method, payload, request_id), http_error)
        return _json(route.provider, raw)

    def _post(self, route: Route, method: str, payload: dict[str, Any],
              request_id: str) -> Any:
        headers = {"Content-Type": "application/json", "X-Client-Request-Id": request_id}
        if route.api_key:
            headers["x-goog-api-key"] = route.api_key
        return self._session.post(
            f"{route.base_url}/{_model_path(route.upstream_model)}:{method}",
            data=orjson.dumps(payload), headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=route.timeouts.connect_s))


def _model_path(model: str) -> str:
    # "gemini-2.5-flash" → "models/gemini-2.5-flash"; "tunedModels/x" is already a path.
    return model if "/" in model else f"models/{model}"


def _json(provider: str, raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError(f"{provider} sent a response that is not a JSON object",
                            code="upstream_bad_response")
    return _checked(provider, data)


def _checked(provider: str, data: dict[str, Any]) -> dict[str, Any]:
    if isinstance(data.get("error"), dict):  # a failure reported inside a stream
        raise google_error(provider, int(data["error"].get("code") or 500), data["error"])
    return data


def completion(route: Route, data: dict[str, Any], request_id: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` for a Gemini `GenerateContentResponse`."""
    _check_prompt(route.provider, data)
    candidates = data.get("candidates") or []
    if not candidates:
        raise UpstreamError(f"{route.provider} returned no candidates",
                            code="upstream_bad_response")
    response_id = str(data.get("responseId") or request_id)
    choices = []
    for position, candidate in enumerate(candidates):
        index = int(candidate.get("index", position))
        texts, calls = _split_parts(candidate)
        tool_calls = [_tool_call(f"{response_id}:{index}", k, call, signature)
                      for k, (call, signature) in enumerate(calls)]
        message: dict[str, Any] = {
            "role": "assistant", "refusal": None, "annotations": [],
            # "" (never null) beside tool calls: see base.py `text_content`.
            "content": "".join(texts)}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choices.append({"index": index, "message": message, "logprobs": _logprobs(candidate),
                        "finish_reason": _finish(route.provider, candidate, bool(tool_calls))})
    return {"id": f"chatcmpl-{response_id}", "object": "chat.completion",
            "created": int(time.time()), "model": data.get("modelVersion") or route.upstream_model,
            "choices": choices, "usage": usage_of(data.get("usageMetadata"))}


class ChunkTranslator:
    """Gemini stream chunks → OpenAI `chat.completion.chunk`s. Gemini sends each function call
    whole, so each becomes one complete `delta.tool_calls` entry."""

    def __init__(self, route: Route, request_id: str) -> None:
        self._provider = route.provider
        self._model = route.upstream_model
        self._id = request_id
        self._started = False
        self._created = int(time.time())
        self._calls: dict[int, int] = {}  # choice index → tool calls sent so far
        self._finished: dict[int, bool] = {}  # every choice seen → whether it has finished
        self._usage: dict[str, Any] | None = None

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        _check_prompt(self._provider, data)
        if not self._started:
            self._started = True
            self._id = str(data.get("responseId") or self._id)
            self._model = str(data.get("modelVersion") or self._model)
        if data.get("usageMetadata"):
            self._usage = data["usageMetadata"]  # each report covers the whole answer so far
        out = []
        for position, candidate in enumerate(data.get("candidates") or ()):
            index = int(candidate.get("index", position))
            if index not in self._finished:
                self._finished[index] = False
                out.append(self._chunk(index, {"role": "assistant", "content": ""}))
            texts, calls = _split_parts(candidate)
            if "".join(texts):
                out.append(self._chunk(index, {"content": "".join(texts)},
                                       logprobs=_logprobs(candidate)))
            if calls:
                sent = self._calls.get(index, 0)
                self._calls[index] = sent + len(calls)
                deltas = [{"index": sent + k,
                           **_tool_call(f"{self._id}:{index}", sent + k, call, signature)}
                          for k, (call, signature) in enumerate(calls)]
                out.append(self._chunk(index, {"tool_calls": deltas}))
            if candidate.get("finishReason"):
                self._finished[index] = True
                finish = _finish(self._provider, candidate, self._calls.get(index, 0) > 0)
                out.append(self._chunk(index, {}, finish=finish))
        return out

    def finish(self) -> dict[str, Any]:
        """The usage chunk; raises `stream_cut` if any choice never got its finish reason."""
        if not self._finished or not all(self._finished.values()):
            raise stream_cut(self._provider)
        return {**self._envelope(), "choices": [], "usage": usage_of(self._usage)}

    def _envelope(self) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self._id}", "object": "chat.completion.chunk",
                "created": self._created, "model": self._model}

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self._envelope(), "choices": [{"index": index, "delta": delta,
                                                 "logprobs": logprobs,
                                                 "finish_reason": finish}]}


def usage_of(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI usage for `usageMetadata`; None when Gemini sent none (the router estimates)."""
    if not meta:
        return None
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    # Tool-use prompt tokens are input Gemini bills (results of its own server-side tools).
    prompt = int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0)
    return Usage(prompt_tokens=prompt,
                 completion_tokens=int(meta.get("candidatesTokenCount") or 0) + thoughts,
                 cached_tokens=int(meta.get("cachedContentTokenCount") or 0),
                 reasoning_tokens=thoughts).to_openai()


def _check_prompt(provider: str, data: dict[str, Any]) -> None:
    feedback = data.get("promptFeedback") or {}
    if reason := feedback.get("blockReason"):
        detail = feedback.get("blockReasonMessage")
        raise provider_error(Kind.CONTENT_FILTERED, provider,
                             f"the prompt was blocked ({reason})" + (f": {detail}" if detail
                                                                      else ""))


def _split_parts(candidate: dict[str, Any]) -> tuple[list[str],
                                                     list[tuple[dict[str, Any], str | None]]]:
    texts: list[str] = []
    calls: list[tuple[dict[str, Any], str | None]] = []
    for part in (candidate.get("content") or {}).get("parts") or ():
        if part.get("thought"):
            continue  # the model's reasoning: billed as reasoning tokens, never shown
        if isinstance(part.get("functionCall"), dict):
            calls.append((part["functionCall"], part.get("thoughtSignature")))
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return texts, calls


def _tool_call(seed: str, ordinal: int, call: dict[str, Any],
               signature: str | None) -> dict[str, Any]:
    name = str(call.get("name") or "")
    key = call.get("id") or f"{seed}:{ordinal}"
    return {"id": make_call_id(f"{key}:{name}", signature), "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(call.get("args") or {}).decode()}}


def _logprobs(candidate: dict[str, Any]) -> dict[str, Any] | None:
    result = candidate.get("logprobsResult")
    if not result:
        return None
    tops = result.get("topCandidates") or []
    content = []
    for i, chosen in enumerate(result.get("chosenCandidates") or ()):
        alternatives = (tops[i].get("candidates") or []) if i < len(tops) else []
        content.append({**_logprob(chosen), "top_logprobs": [_logprob(a) for a in alternatives]})
    return {"content": content, "refusal": None}


def _logprob(candidate: dict[str, Any]) -> dict[str, Any]:
    token = str(candidate.get("token") or "")
    return {"token": token, "logprob": float(candidate.get("logProbability") or 0.0),
            "bytes": list(token.encode())}


def _finish(provider: str, candidate: dict[str, Any], has_calls: bool) -> str:
    reason = str(candidate.get("finishReason") or "STOP")
    if reason in _FAILED:
        detail = candidate.get("finishMessage") or "the model's answer was unusable"
        raise provider_error(_FAILED[reason], provider, f"{reason}: {detail}")
    finish = _FINISH.get(reason, "stop")
    return "tool_calls" if finish == "stop" and has_calls else finish


def http_error(provider: str, status: int, raw: bytes) -> SwitchyardError:
    """Google error bodies: {"error": {"code", "message", "status", "details"}}."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, list) and body:  # the JSON-array (non-SSE) stream wraps it
        body = body[0]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return google_error(provider, status, body["error"])
    message = raw[:200].decode(errors="replace") or f"HTTP {status}"
    return provider_error(kind_of_status(status), provider, message)


def google_error(provider: str, status: int, error: dict[str, Any]) -> SwitchyardError:
    kind = _STATUS_KIND.get(str(error.get("status")), kind_of_status(status))
    details = [d for d in error.get("details") or () if isinstance(d, dict)]
    reasons = {d.get("reason") for d in details}
    message = str(error.get("message") or f"HTTP {status}")
    if "API_KEY_INVALID" in reasons:
        kind = Kind.AUTH  # Google says 400 INVALID_ARGUMENT for a bad key: our fault, not theirs
    return provider_error(refine_bad_request(kind, message), provider, message,
                          retry_after_s=_retry_delay(details))


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """A google.rpc.RetryInfo's `retryDelay` (a protobuf Duration in JSON: "1.5s")."""
    for detail in details:
        delay = detail.get("retryDelay")
        if str(detail.get("@type", "")).endswith("RetryInfo") and isinstance(delay, str):
            try:
                seconds = float(delay.removesuffix("s"))
            except ValueError:
                return None
            return seconds if 0 <= seconds < math.inf else None
    return None


def embedding_request(provider: str, body: dict[str, Any]) -> tuple[list[str], int | None, bool]:
    """(texts, outputDimensionality, base64 wanted) of an OpenAI embeddings request."""
    for key, value in body.items():
        if key not in _EMBED_PARAMS and value is not None:
            raise unsupported(provider, key, "it has no Gemini translation")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise InvalidRequest("input must be a string or a non-empty array", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise unsupported(provider, "input", "Gemini embeds text, not token arrays")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise unsupported(provider, "encoding_format", f"{fmt!r} is not float or base64")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or dimensions < 1):
        raise InvalidRequest("dimensions must be a positive integer", param="dimensions")
    return texts, dimensions, fmt == "base64"


def _b64(vector: list[float]) -> str:
    # OpenAI's base64 encoding: the vector as little-endian float32s.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
