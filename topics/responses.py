"""What the OpenAI Responses protocol means in the gateway: the ingress that serves it to
clients (`ingress/responses.py`, `ingress/responses_translate.py`) and the stored
conversation state behind `previous_response_id` and `GET /v1/responses/{id}`
(`state/responses.py`).

A stored response is one JSON record per response id, kept per tenant for a TTL:

    {"response": {...the Response object as the client received it...},
     "messages": [...the conversation so far, as Chat Completions messages...]}

`messages` is what a later request naming the response as its `previous_response_id`
continues: every earlier turn's input and output, without any turn's `instructions` (the
Responses API does not carry them over: each request states its own)."""

from __future__ import annotations

import uuid
from typing import Any

RESPONSE_PREFIX = "resp_"
MESSAGE_PREFIX = "msg_"
CALL_ITEM_PREFIX = "fc_"

# OpenAI finish_reason → (status, incomplete_details.reason) of a Response.
STATUS_OF_FINISH: dict[str, tuple[str, str | None]] = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "function_call": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Chat Completions usage → a Response's usage (the same counts under its names)."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
