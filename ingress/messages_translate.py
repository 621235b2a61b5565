"""Anthropic Messages ⇄ the OpenAI Chat Completions shape the pipeline carries, for the
Messages ingress (`ingress/messages.py`). Pure functions; the tables both directions share
with the provider dialect (`workers/providers/anthropic.py`) are in `topics/anthropic.py`.

Request (Anthropic → OpenAI), so that every route, of every dialect, can serve it:
- `system` (a string or text blocks) → a leading `system` message.
- `messages`: text blocks → text parts; `image` blocks (source `base64` or `url`) →
  `image_url` parts (a data URL for base64); an assistant's `tool_use` blocks →
  `tool_calls` (`input` as JSON `arguments`); a user's `tool_result` blocks → `tool`
  messages before the rest of that turn (their text; `is_error` has no counterpart);
  `thinking` / `redacted_thinking` blocks of past assistant turns are left out. Any other
  block type (documents, search results, server tools' blocks) is refused with a 400: the
  OpenAI shape cannot hold it, and the route is not chosen yet.
- `max_tokens` → `max_tokens`; `stop_sequences` → `stop`; `temperature`, `top_p`, `top_k`
  as they are; `metadata.user_id` → `user`; `stream` as it is.
- `tools` (custom tools: `name`, `description`, `input_schema`) → function tools;
  `tool_choice` auto / any / tool / none → auto / required / named / none, and its
  `disable_parallel_tool_use` → `parallel_tool_calls: false`. Server tools (a `type` other
  than `custom`) are refused.
- `cache_control` marks are dropped from the translation; every other field (`thinking`,
  `service_tier`, betas' fields...) is left out of it. Both reach Anthropic routes untouched
  through the native request (`topics/anthropic.py`).
- The gateway's own body extensions (`switchyard`, `policy`, `models`) are moved to the
  OpenAI body, where admission reads them, and out of the native one.

Answer (OpenAI → Anthropic): a `message` whose content is a text block (when there is
text) then one `tool_use` block per tool call; `finish_reason` → `stop_reason`; usage as
`topics.anthropic.anthropic_usage`. Streams: `EventWriter` turns `chat.completion.chunk`s
into the `message_start`, `content_block_*`, `message_delta`, `message_stop` sequence."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from topics.anthropic import NATIVE, STOP_OF_FINISH, anthropic_usage
from topics.errors import InvalidRequest

# Taken off the Anthropic body into the OpenAI one: the gateway's request extensions.
GATEWAY_FIELDS = ("switchyard", "policy", "models")
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI Chat Completions body for an Anthropic Messages body (already checked by
    `ingress/messages.py` for its required fields and their types)."""
    if NATIVE in body:
        raise InvalidRequest(f"{NATIVE} is reserved for the gateway", param=NATIVE)
    chat: dict[str, Any] = {"model": body["model"], "max_tokens": body["max_tokens"]}
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None and system != "" and system != []:
        messages.append({"role": "system", "content": _text_only(system, "system")})
    for i, turn in enumerate(body["messages"]):
        messages.extend(_turn(turn, f"messages.{i}"))
    chat["messages"] = messages
    if body.get("stream"):
        chat["stream"] = True
    if (stop := body.get("stop_sequences")) is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop_sequences must be an array of strings",
                                 param="stop_sequences")
        if stop:
            chat["stop"] = stop
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if (tools := body.get("tools")) is not None:
        chat["tools"] = _tools(tools)
    if (choice := body.get("tool_choice")) is not None:
        _tool_choice(choice, chat)
    for name in GATEWAY_FIELDS:
        if name in body:
            chat[name] = body[name]
    return chat


def native_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's body as an Anthropic route is sent it: less the gateway's extensions."""
    return {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}


def _blocks(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        return content
    raise InvalidRequest(f"{where} must be a string or an array of content blocks",
                         param=where)


def _text_of(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text must be a string", param=f"{where}.text")
    return text


def _text_only(content: object, where: str) -> str | list[dict[str, Any]]:
    """A system prompt or a tool result's content: its text, as a string or text parts."""
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(_blocks(content, where)):
        if block.get("type") != "text":
            raise InvalidRequest(f"{where}.{j}: only text blocks can be translated here "
                                 f"(not {block.get('type')!r})", param=f"{where}.{j}.type")
        parts.append({"type": "text", "text": _text_of(block, f"{where}.{j}")})
    return parts


def _turn(turn: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(turn, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role = turn.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role must be 'user' or 'assistant'",
                             param=f"{where}.role")
    content = turn.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    results: list[dict[str, Any]] = []  # a user turn's tool results: tool messages first
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, f"{where}.content")):
        at = f"{where}.content.{j}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, at)})
        elif kind == "image" and role == "user":
            parts.append(_image(block.get("source"), at))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, at))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at))
        elif kind in _DROPPED_BLOCKS and role == "assistant":
            continue  # past reasoning: no Chat Completions counterpart to send it as
        else:
            raise InvalidRequest(f"{at}: {kind!r} blocks in {role} turns cannot be "
                                 "translated for every route", param=f"{at}.type")
    out = list(results)
    if role == "assistant":
        text = "".join(p["text"] for p in parts)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        if text or calls:
            out.append(message)
    elif parts or not results:
        out.append({"role": "user", "content": parts})
    return out


def _image(source: object, where: str) -> dict[str, Any]:
    if isinstance(source, dict) and source.get("type") == "base64" \
            and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif isinstance(source, dict) and source.get("type") == "url" \
            and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise InvalidRequest(f"{where}.source must be a base64 or url image source",
                             param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str) \
            or not isinstance(arguments, dict):
        raise InvalidRequest(f"{where} needs an id, a name and an input object", param=where)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.tool_use_id is required", param=f"{where}.tool_use_id")
    content = block.get("content", "")
    return {"role": "tool", "tool_call_id": call_id,
            "content": _text_only(content, f"{where}.content") if content else ""}


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"{where}.name is required", param=f"{where}.name")
        if tool.get("type", "custom") != "custom":
            raise InvalidRequest(f"{where}: server tools ({tool.get('type')!r}) cannot be "
                                 "translated for every route", param=f"{where}.type")
        function: dict[str, Any] = {"name": tool["name"],
                                    "parameters": tool.get("input_schema")
                                    or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if tool.get("strict") is True:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICE:
        chat["tool_choice"] = _TOOL_CHOICE[kind]
    else:
        raise InvalidRequest("tool_choice must be auto, any, tool (with a name) or none",
                             param="tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True \
            and chat.get("tools"):
        chat["parallel_tool_calls"] = False


# --- answers -------------------------------------------------------------------------------


def message_id(openai_id: object) -> str:
    """Anthropic's ids start `msg_`; the provider's own id is kept behind it when it has one."""
    text = str(openai_id or "")
    if text.startswith("msg_"):
        return text
    return f"msg_{text or uuid.uuid4().hex[:24]}"


def _input_of(arguments: object) -> dict[str, Any]:
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        parsed = None
    # Arguments that are not a JSON object (a model's broken output) still reach the client.
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}


def to_message(completion: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic `message` for an OpenAI `chat.completion`."""
    choice = (completion.get("choices") or [{}])[0]
    answer = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if answer.get("content"):
        content.append({"type": "text", "text": str(answer["content"])})
    for call in answer.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": str(call.get("id") or ""),
                        "name": str(function.get("name") or ""),
                        "input": _input_of(function.get("arguments"))})
    return {"id": message_id(completion.get("id")), "type": "message", "role": "assistant",
            "model": str(completion.get("model") or ""), "content": content,
            "stop_reason": STOP_OF_FINISH.get(str(choice.get("finish_reason")), "end_turn"),
            "stop_sequence": None, "usage": anthropic_usage(completion.get("usage"))}


def event(name: str, data: dict[str, Any]) -> bytes:
    """One named SSE event, as Anthropic sends them (the name repeated as `type`)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) \
        + b"\n\n"


PING = event("ping", {})


class EventWriter:
    """`chat.completion.chunk`s in, Anthropic stream events out, in its order: message_start
    once, then per content block start, deltas, stop; at the end message_delta (stop reason,
    usage) and message_stop. A block is closed when the next one opens: text, then each tool
    call (`input_json_delta`), as the chunks bring them."""

    def __init__(self) -> None:
        self._started = False
        self._index = -1  # the open block's index; -1 before the first
        self._open: str | None = None  # "text", or the OpenAI ordinal of the open tool call
        self._stop_reason: str | None = None

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        out = self._start(chunk)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # one answer per message
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                if self._open != "text":
                    out.extend(self._open_block("text", {"type": "text", "text": ""}))
                out.append(event("content_block_delta", {
                    "index": self._index, "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                out.extend(self._tool_delta(call))
            if finish := choice.get("finish_reason"):
                self._stop_reason = STOP_OF_FINISH.get(str(finish), "end_turn")
        return out

    def end(self, usage: dict[str, Any] | None, model: str | None = None) -> list[bytes]:
        """The closing events, with the usage the answer's `done` frame reports."""
        out = self._start({"model": model})
        if self._open is not None:
            out.append(event("content_block_stop", {"index": self._index}))
            self._open = None
        out.append(event("message_delta", {
            "delta": {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None},
            "usage": anthropic_usage(usage)}))
        out.append(event("message_stop", {}))
        return out

    def _start(self, chunk: dict[str, Any]) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        # Input tokens are known at the end only (OpenAI streams report usage last): the
        # message_delta's cumulative usage carries them, as the API's own streams may.
        return [event("message_start", {"message": {
            "id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
            "model": str(chunk.get("model") or ""), "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})]

    def _open_block(self, key: str, block: dict[str, Any]) -> list[bytes]:
        out = []
        if self._open is not None:
            out.append(event("content_block_stop", {"index": self._index}))
        self._index += 1
        self._open = key
        out.append(event("content_block_start", {"index": self._index, "content_block": block}))
        return out

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        key = f"tool:{call.get('index', 0)}"
        function = call.get("function") or {}
        out: list[bytes] = []
        if self._open != key:
            out.extend(self._open_block(key, {
                "type": "tool_use", "id": str(call.get("id") or ""),
                "name": str(function.get("name") or ""), "input": {}}))
        if arguments := function.get("arguments"):
            out.append(event("content_block_delta", {
                "index": self._index,
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        return out
