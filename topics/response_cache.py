"""The response cache's contract: a tenant's cache policy, the request header, what makes a
request cacheable, the entry's key, and how an answer is assembled from its stream and
replayed as one. Pure: no I/O.

- `CachePolicy` is the `cache` field of a tenant's routing policy (`topics/routing_policy.py`,
  set with PUT /v1/routing/policy, audited there).
- `cache_key(...)`: SHA-256 of the canonical JSON of the tenant, the key's model restriction,
  the request's routing options and its body without the fields that cannot change the
  answer (`stream`, `user`, ...). The tenant id is in the hash and in the Redis key itself.
- `Assembler` turns the chunks of a streamed answer into the chat completion a
  non-streamed request would have got; `replay_chunks` does the reverse for a hit.

The other files of the feature: `state/response_cache.py` reads and writes entries in Redis;
`ingress/response_cache.py` decides per request, answers hits (JSON or SSE), stores misses,
bills hits and counts them; docs/cache.md.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool

HEADER = "x-switchyard-cache"  # request: on | off | refresh; response: hit | miss | ...
TTL_HEADER = "x-switchyard-cache-ttl"  # request: the entry's lifetime, seconds
Directive = Literal["on", "off", "refresh"]
DIRECTIVES: tuple[str, ...] = ("on", "off", "refresh")

# Fields that do not change the answer, left out of the key: how it is delivered, who the
# end user is (OpenAI's abuse tracking), whether the provider stores it.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "store", "safety_identifier",
                         "prompt_cache_key", "service_tier"})
# OpenAI's defaults: a field sent with its default value asks the same as one left out.
_DEFAULTS: dict[str, object] = {"n": 1, "top_p": 1, "presence_penalty": 0,
                                "frequency_penalty": 0}


class CachePolicy(BaseModel):
    """A tenant's response-cache policy (docs/cache.md). The default caches nothing unless a
    request asks with `x-switchyard-cache: on`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Every cacheable request of the tenant is looked up and stored without a header
    # (`x-switchyard-cache: off` still opts a request out).
    enabled: StrictBool = False
    # The entries' lifetime when a request names none; None: `cache.default_ttl_s`. Either
    # is capped at `cache.max_ttl_s`.
    ttl_s: int | None = Field(default=None, ge=1, le=30 * 86400)
    # Cache requests whose answer is sampled (temperature other than 0): a hit then returns
    # the one answer that was stored, every time.
    allow_nondeterministic: StrictBool = False


def deterministic(body: dict[str, Any]) -> bool:
    """Whether the request asks for a reproducible answer: `temperature` 0 (left out, it is
    the provider's default, 1)."""
    temperature = body.get("temperature")
    return (isinstance(temperature, int | float) and not isinstance(temperature, bool)
            and temperature == 0)


def _canonical(value: Any) -> Any:
    # 0.0 and 0 (1.0 and 1) ask the same; JSON writes them differently.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def normalized(body: dict[str, Any]) -> dict[str, Any]:
    """The request body as the key sees it: delivery-only fields left out, defaults dropped,
    `max_tokens` and `max_completion_tokens` one field, integral floats as integers."""
    out = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
    if "max_tokens" in out and "max_completion_tokens" not in out:
        out["max_completion_tokens"] = out.pop("max_tokens")
    out = {k: _canonical(v) for k, v in out.items()}
    for name, default in _DEFAULTS.items():
        if name in out and out[name] == default and not isinstance(out[name], bool):
            del out[name]
    return out


def cache_key(tenant_id: str, endpoint: str, body: dict[str, Any], routing: dict[str, Any],
              allowed_models: frozenset[str] | None) -> str:
    """The entry's digest (hex SHA-256). The key's model restriction is part of it: with
    `model: "auto"` the answer comes from a model the key may use."""
    document = {"tenant": tenant_id, "endpoint": endpoint, "body": normalized(body),
                "routing": _canonical(routing),
                "models": None if allowed_models is None else sorted(allowed_models)}
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Assembler:
    """The chat completion a streamed answer amounts to, built from its chunks (each a
    `chat.completion.chunk` object): per choice, the role, the content, the refusal, the tool
    calls (their argument pieces joined) and the finish reason."""

    def __init__(self) -> None:
        self._head: dict[str, Any] | None = None
        self._choices: dict[int, dict[str, Any]] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if self._head is None:
            self._head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint",
                                                "service_tier") if k in chunk}
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            into = self._choices.setdefault(index, {"role": "assistant", "content": [],
                                                    "refusal": [], "tools": {},
                                                    "finish_reason": None})
            delta = choice.get("delta") or {}
            if isinstance(delta.get("role"), str):
                into["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                into["content"].append(delta["content"])
            if isinstance(delta.get("refusal"), str):
                into["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                self._tool_call(into["tools"], call)
            if choice.get("finish_reason") is not None:
                into["finish_reason"] = choice["finish_reason"]

    @staticmethod
    def _tool_call(tools: dict[int, dict[str, Any]], call: dict[str, Any]) -> None:
        at = tools.setdefault(call.get("index", len(tools)),
                              {"id": None, "type": "function", "name": "", "arguments": []})
        if call.get("id"):
            at["id"] = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            at["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            at["arguments"].append(function["arguments"])

    @property
    def complete(self) -> bool:
        """Every choice has its finish reason: the answer was not cut short."""
        return bool(self._choices) and all(c["finish_reason"] is not None
                                           for c in self._choices.values())

    def completion(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            built = self._choices[index]
            message: dict[str, Any] = {"role": built["role"],
                                       "content": "".join(built["content"]),
                                       "refusal": "".join(built["refusal"]) or None}
            if built["tools"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": t["type"],
                     "function": {"name": t["name"], "arguments": "".join(t["arguments"])}}
                    for _, t in sorted(built["tools"].items())]
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": built["finish_reason"]})
        out = {**(self._head or {}), "object": "chat.completion", "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def replay_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored completion as the chunks of a live stream: per choice, the role, the content,
    each tool call, then the finish reason (the usage chunk and [DONE] are the caller's)."""
    head = {"id": completion.get("id", ""), "object": "chat.completion.chunk",
            "created": completion.get("created", 0), "model": completion.get("model", "")}
    if "system_fingerprint" in completion:
        head["system_fingerprint"] = completion["system_fingerprint"]

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    out = []
    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        out.append(chunk(index, {"role": message.get("role", "assistant"), "content": ""}))
        if message.get("content"):
            out.append(chunk(index, {"content": message["content"]}))
        if message.get("refusal"):
            out.append(chunk(index, {"refusal": message["refusal"]}))
        for i, call in enumerate(message.get("tool_calls") or ()):
            out.append(chunk(index, {"tool_calls": [{"index": i, **call}]}))
        out.append(chunk(index, {}, choice.get("finish_reason") or "stop"))
    return out
