"""OpenAI Chat Completions request → Anthropic Messages request (API version 2023-06-01).

Every top-level OpenAI parameter is translated, accepted as harmless, or refused with a 400
`unsupported_parameter` naming it: none is dropped silently.

Translated:
- `system` / `developer` messages → top-level `system` text blocks, in order, wherever they
  stood. (The 2.x SDK also types `role: "system"` turns inside `messages`, but models before
  Opus 4.8 refuse them, so lifting is the form every Claude model accepts.)
- `user` / `assistant` / `tool` messages → alternating turns; consecutive turns of one role
  are merged (a `tool` message becomes a `tool_result` block in a user turn, so tool results
  and the user text after them share one turn, results first, as the API requires).
- parts: `text`; `image_url` with an http(s) URL → image source `url`; with a base64 data URL
  → source `base64` (jpeg/png/gif/webp). `detail` has no Anthropic counterpart and is ignored.
- assistant `tool_calls` → `tool_use` blocks (`arguments` parsed into `input`).
- `tools` (function) → `name` / `description` / `input_schema` (+ `strict`); `tool_choice`
  auto/none/required/named → auto/none/any/tool; `parallel_tool_calls: false` →
  `disable_parallel_tool_use`.
- `max_completion_tokens` (else `max_tokens`) → `max_tokens`, which Anthropic requires:
  `DEFAULT_MAX_TOKENS` (4096) when the client gave none.
- `stop` → `stop_sequences`; `temperature` (0–1 only; Anthropic's range), `top_p`, and the
  common `top_k` extension pass through; `user` / `safety_identifier` → `metadata.user_id`;
  `reasoning_effort` low/medium/high/xhigh/max → `output_config.effort`; `service_tier`
  auto → (default), default → `standard_only`.
- `response_format`: `json_schema` → Anthropic's native structured outputs
  (`output_config.format = {"type": "json_schema", "schema": ...}`, GA in the API reference
  and in the installed SDK for Claude 4.5 and later): constrained decoding, the answer
  arrives as a text block holding the JSON document. The schema is sent as given, so it
  must respect Anthropic's schema subset (e.g. `additionalProperties: false` on objects, as
  OpenAI's strict mode also requires); a schema Anthropic rejects comes back as its 400.
  `json_object` cannot be expressed natively (an object schema without properties admits
  only `{}`), so it is emulated with a forced tool `JSON_TOOL` whose `input_schema` is
  `{"type": "object"}`; its `input` becomes the message `content` and the finish reason
  `stop`. Forced tool use is incompatible with extended thinking; models that think by
  default refuse it with a 400.

Accepted and ignored (no effect on the answer): `stream_options` (usage is always reported),
`metadata` and `store` (OpenAI-side storage), `prompt_cache_key` / `prompt_cache_retention` /
`prompt_cache_options` (OpenAI cache hints), a message's `name`, and the no-op values `n: 1`,
`logprobs: false`, `top_logprobs: 0`, zero penalties, empty `logit_bias`, `modalities:
["text"]`, `parallel_tool_calls: true`.

Refused: `n` > 1, `logprobs`, `top_logprobs`, `presence_penalty`, `frequency_penalty`,
`logit_bias`, `seed`, `audio`, `modalities` with audio, `prediction`, `web_search_options`,
`verbosity`, `moderation`, legacy `functions` / `function_call`, `temperature` > 1,
`reasoning_effort` none/minimal, other `service_tier`s, non-function tools, non-text/image
parts, and any parameter that is not part of Chat Completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from topics.errors import InvalidRequest
from workers.providers.errors import unsupported

DEFAULT_MAX_TOKENS = 4096
JSON_TOOL = "json_response"  # the forced tool that carries a json_object answer
_JSON_TOOL_DESCRIPTION = "Give your complete answer as a JSON object: the input is the answer."
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
_IGNORED = frozenset({"stream_options", "metadata", "store", "prompt_cache_key",
                      "prompt_cache_retention", "prompt_cache_options"})
_HANDLED = frozenset({"model", "messages", "stream", "max_tokens", "max_completion_tokens",
                      "stop", "temperature", "top_p", "top_k", "user", "safety_identifier",
                      "tools", "tool_choice", "parallel_tool_calls", "response_format",
                      "reasoning_effort", "service_tier", "n", "logprobs", "top_logprobs",
                      "presence_penalty", "frequency_penalty", "logit_bias", "modalities"})
# Parameters with no Anthropic counterpart at any value: refused whenever they are set.
_REFUSED = {
    "seed": "Anthropic has no sampling seed",
    "audio": "Anthropic answers in text only",
    "prediction": "Anthropic has no predicted outputs",
    "web_search_options": "use Anthropic's web search tool through a native client",
    "verbosity": "Anthropic has no verbosity control",
    "moderation": "Anthropic has no moderation option",
    "functions": "use tools",
    "function_call": "use tool_choice",
}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    payload: dict[str, Any]  # the Anthropic request body, without `stream`
    json_tool: str | None = None  # set when a forced tool carries a json_object answer


def to_messages_request(provider: str, body: dict[str, Any], model: str) -> MessagesRequest:
    _refuse_unhonourable(provider, body)
    system, messages = _messages(provider, body.get("messages"))
    payload: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body),
                               "messages": messages}
    if system:
        payload["system"] = system
    if (stop := body.get("stop")) is not None:
        payload["stop_sequences"] = _stop(stop)
    if (temperature := body.get("temperature")) is not None:
        if isinstance(temperature, int | float) and temperature > 1:
            raise unsupported(provider, "temperature", "Anthropic accepts 0 to 1")
        payload["temperature"] = temperature
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            payload[name] = body[name]
    user = body.get("safety_identifier") or body.get("user")
    if user:
        payload["metadata"] = {"user_id": str(user)}
    output_config: dict[str, Any] = {}
    if (effort := body.get("reasoning_effort")) is not None:
        if effort not in _EFFORTS:
            raise unsupported(provider, "reasoning_effort",
                              f"Anthropic's effort levels are {', '.join(sorted(_EFFORTS))}")
        output_config["effort"] = effort
    if (tier := body.get("service_tier")) not in (None, "auto"):
        if tier != "default":
            raise unsupported(provider, "service_tier", f"{tier!r} has no Anthropic tier")
        payload["service_tier"] = "standard_only"
    tools = _tools(provider, body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    if tools and body.get("parallel_tool_calls") is False:
        # Anthropic carries this flag on tool_choice, so an absent choice becomes "auto".
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    json_tool, choice = _response_format(provider, body.get("response_format"), tools, choice,
                                         output_config)
    if tools:
        payload["tools"] = tools
    if choice is not None:
        payload["tool_choice"] = choice
    if output_config:
        payload["output_config"] = output_config
    return MessagesRequest(payload, json_tool)


def _refuse_unhonourable(provider: str, body: dict[str, Any]) -> None:
    for name in body:
        if name in _REFUSED and body[name] is not None:
            raise unsupported(provider, name, _REFUSED[name])
        if name not in _HANDLED and name not in _IGNORED and name not in _REFUSED:
            raise unsupported(provider, name, "not a Chat Completions parameter it can honour")
    if body.get("n") not in (None, 1):
        raise unsupported(provider, "n", "Anthropic returns one choice per request")
    if body.get("logprobs"):
        raise unsupported(provider, "logprobs", "Anthropic returns no log probabilities")
    if body.get("top_logprobs"):
        raise unsupported(provider, "top_logprobs", "Anthropic returns no log probabilities")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise unsupported(provider, name, "Anthropic has no repetition penalties")
    if body.get("logit_bias"):
        raise unsupported(provider, "logit_bias", "Anthropic has no token biasing")
    modalities = body.get("modalities")
    if modalities is not None and list(modalities) != ["text"]:
        raise unsupported(provider, "modalities", "Anthropic answers in text only")


def _max_tokens(body: dict[str, Any]) -> int:
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InvalidRequest("max_tokens must be a non-negative integer", param="max_tokens")
    return limit


def _stop(stop: object) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise InvalidRequest("stop must be a string or an array of strings", param="stop")


def _messages(provider: str,
              raw: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(provider, msg.get("content"), where))
            continue
        if role == "user":
            blocks = _user_blocks(provider, msg.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(provider, msg, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(provider, msg, where)]
        else:
            raise unsupported(provider, f"{where}.role", f"role {role!r}")
        # The API wants alternating turns: same-role neighbours become one turn.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _parts(content: object, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise InvalidRequest(f"{where}.content must be a string or an array of parts",
                         param=f"{where}.content")


def _text(part: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    text = part.get(key)
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
    # Anthropic rejects empty text blocks; an empty part says nothing, so it is left out.
    return [{"type": "text", "text": text}] if text else []


def _text_blocks(provider: str, content: object, where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(_parts(content, where)):
        at = f"{where}.content[{j}]"
        if part.get("type") != "text":
            raise unsupported(provider, f"{at}.type", f"{part.get('type')!r} parts here")
        blocks.extend(_text(part, "text", at))
    return blocks


def _user_blocks(provider: str, content: object, where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(_parts(content, where)):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            blocks.extend(_text(part, "text", at))
        elif kind == "image_url":
            blocks.append(_image(provider, part.get("image_url"), at))
        else:
            raise unsupported(provider, f"{at}.type", f"{kind!r} content parts")
    return blocks


def _image(provider: str, image: object, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else None
    param = f"{where}.image_url.url"
    if not isinstance(url, str):
        raise InvalidRequest(f"{param} must be a string", param=param)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media, *params = header.split(";")
        if not comma or "base64" not in params or not data:
            raise InvalidRequest(f"{param} must be an http(s) URL or a base64 data URL",
                                 param=param)
        media = media.strip().lower()
        if media not in _IMAGE_TYPES:
            raise unsupported(provider, param, f"image type {media or 'unknown'!r}; it takes "
                              + ", ".join(sorted(_IMAGE_TYPES)))
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    raise InvalidRequest(f"{param} must be an http(s) URL or a base64 data URL", param=param)


def _assistant_blocks(provider: str, msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    for name in ("audio", "function_call"):
        if msg.get(name) is not None:
            raise unsupported(provider, f"{where}.{name}", "use text and tool_calls")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(_parts(msg.get("content"), where)):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind in ("text", "refusal"):  # a past refusal is what the assistant said
            blocks.extend(_text(part, str(kind), at))
        else:
            raise unsupported(provider, f"{at}.type", f"{kind!r} parts in assistant turns")
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    for k, call in enumerate(calls):
        blocks.append(_tool_use(provider, call, f"{where}.tool_calls[{k}]"))
    return blocks


def _tool_use(provider: str, call: object, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    if call.get("type", "function") != "function":
        raise unsupported(provider, f"{where}.type", f"{call.get('type')!r} tool calls")
    fn = call.get("function")
    call_id = call.get("id")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or not isinstance(call_id, str):
        raise InvalidRequest(f"{where} needs an id and a function name", param=where)
    arguments = fn.get("arguments") or ""
    param = f"{where}.function.arguments"
    try:
        parsed = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{param} must be a JSON object", param=param)
    return {"type": "tool_use", "id": call_id, "name": fn["name"], "input": parsed}


def _tool_result(provider: str, msg: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.tool_call_id is required for tool messages",
                             param=f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif (blocks := _text_blocks(provider, content, where)):
        block["content"] = blocks
    return block


def _tools(provider: str, raw: object) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("tools must be an array", param="tools")
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if tool.get("type") != "function":
            raise unsupported(provider, f"{where}.type", f"{tool.get('type')!r} tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"{where}.function.name is required",
                                 param=f"{where}.function.name")
        out: dict[str, Any] = {
            "name": fn["name"],
            # Anthropic requires an object schema even for a tool without arguments.
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            out["description"] = fn["description"]
        if fn.get("strict") is True:
            out["strict"] = True
        tools.append(out)
    return tools


def _tool_choice(choice: object, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        # Without tools, "auto" and "none" mean the same thing: a plain answer.
        return {"type": choice} if tools else None
    if choice == "required":
        out: dict[str, Any] = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise InvalidRequest("tool_choice must be auto, none, required or a named function",
                             param="tool_choice")
    if not tools:
        raise InvalidRequest("tool_choice requires tools", param="tool_choice")
    return out


def _response_format(provider: str, fmt: object, tools: list[dict[str, Any]],
                     choice: dict[str, Any] | None, output_config: dict[str, Any]
                     ) -> tuple[str | None, dict[str, Any] | None]:
    """Fill in JSON mode; returns the forced tool's name (if emulated) and the tool choice."""
    if fmt is None:
        return None, choice
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, choice
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            output_config["format"] = {"type": "json_schema", "schema": schema}
            return None, choice
    elif kind != "json_object":
        raise unsupported(provider, "response_format", f"type {kind!r}")
    if choice is not None and choice["type"] in ("any", "tool"):
        return None, choice  # the answer must be a tool call: there is no text to shape
    if any(tool["name"] == JSON_TOOL for tool in tools):
        raise InvalidRequest(f"a tool may not be named {JSON_TOOL!r} in JSON mode on "
                             f"{provider}", param="tools")
    user_tools = bool(tools) and (choice is None or choice["type"] != "none")
    tools.append({"name": JSON_TOOL, "description": _JSON_TOOL_DESCRIPTION,
                  "input_schema": {"type": "object"}})
    if user_tools:
        # Either call one of the client's tools or answer through the JSON tool.
        forced: dict[str, Any] = {"type": "any"}
        if choice is not None and choice.get("disable_parallel_tool_use"):
            forced["disable_parallel_tool_use"] = True
    else:
        forced = {"type": "tool", "name": JSON_TOOL, "disable_parallel_tool_use": True}
    return JSON_TOOL, forced
