"""What the Anthropic Messages protocol means on both sides of the gateway: the ingress that
serves it to clients (`ingress/messages.py`, `ingress/messages_translate.py`) and the dialect
that speaks it to providers (`workers/providers/anthropic.py`). One table each for stop
reasons and usage, so an answer translated out and back means what it meant.

Native pass-through: a request that came in as Anthropic Messages travels as the OpenAI
Chat Completions body every stage reads (routing, classification, budgets, councils), plus
the client's own Anthropic body and headers under one reserved body field, `NATIVE`:

    {"protocol": "anthropic", "body": {...}, "headers": {"anthropic-version": "...",
                                                         "anthropic-beta": "..."}}

An Anthropic-dialect route sends that body (its model replaced by the route's upstream
model) with those headers, so what the OpenAI shape cannot carry (`cache_control`, beta
features, `thinking`, documents...) reaches Anthropic untouched; every other dialect drops
the field (`without_native`) and translates the OpenAI body as for any chat completion.
The chat-completions ingress refuses the field: only the Messages ingress sets it."""

from __future__ import annotations

from typing import Any

NATIVE = "switchyard_native"
PROTOCOL = "anthropic"
# Headers of the client's request passed to Anthropic routes as they came.
PASSED_HEADERS = ("anthropic-version", "anthropic-beta")
API_VERSION = "2023-06-01"  # what the gateway sends when the client said nothing

# Anthropic stop_reason → OpenAI finish_reason.
FINISH_OF_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # only server tools pause, and none are ever declared
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}
# OpenAI finish_reason → Anthropic stop_reason (the first of each above, by meaning).
STOP_OF_FINISH = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal",
                  "tool_calls": "tool_use", "function_call": "tool_use"}


def native_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The client's Anthropic request carried in `body`, if any."""
    native = body.get(NATIVE)
    if isinstance(native, dict) and native.get("protocol") == PROTOCOL \
            and isinstance(native.get("body"), dict):
        return native
    return None


def without_native(body: dict[str, Any]) -> dict[str, Any]:
    """`body` without the native request (itself when it has none: nothing is copied)."""
    if NATIVE not in body:
        return body
    return {k: v for k, v in body.items() if k != NATIVE}


def openai_usage(usage: dict[str, Any]) -> dict[str, int]:
    """Anthropic usage → (prompt, completion, cached, reasoning) tokens. Anthropic bills three
    kinds of input; OpenAI's prompt_tokens is their sum, cached_tokens the cache reads."""
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    details = usage.get("output_tokens_details") or {}
    return {"prompt_tokens": int(usage.get("input_tokens") or 0) + read + written,
            "completion_tokens": int(usage.get("output_tokens") or 0),
            "cached_tokens": read,
            "reasoning_tokens": int(details.get("thinking_tokens") or 0)}


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI usage → Anthropic's: input_tokens are the prompt's uncached tokens, cache reads
    apart. Cache writes cannot be told from other input once summed: they count as input."""
    usage = usage or {}
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"input_tokens": max(int(usage.get("prompt_tokens") or 0) - cached, 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}
