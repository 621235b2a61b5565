"""OpenAI Responses ⇄ the Chat Completions shape the pipeline carries, for the Responses
ingress (`ingress/responses.py`). Pure functions; the protocol's ids, statuses and usage are
in `topics/responses.py`.

Request (Responses → Chat Completions), so that every route, of every dialect, can serve it:
- `instructions` → a leading `system` message (this request's only: never stored, never
  carried over by `previous_response_id`).
- the stored conversation of `previous_response_id`, then `input`: a string → a user
  message; message items (`role` user / assistant / system / developer, `type` message or
  left out) with a string or parts: `input_text` and an assistant's `output_text` /
  `refusal` → text, `input_image` (`image_url`, a URL or a data URL; `detail`) →
  `image_url` parts; `function_call` items → the assistant's `tool_calls` (those right after
  an assistant message join it); `function_call_output` items → `tool` messages;
  `reasoning` items are left out. Files, `file_id` images and item references are refused
  with a 400: the route is not chosen yet, and not every dialect could take them.
- `tools` (function tools: `name`, `description`, `parameters`, `strict`) → function tools;
  other tool types (web search, file search, computer use...) are refused. `tool_choice`
  auto / none / required / `{"type": "function", "name"}` → the same in Chat Completions.
- `max_output_tokens` → `max_tokens`; `temperature`, `top_p`, `parallel_tool_calls`, `user`
  as they are; `text.format` json_object / json_schema → `response_format`; `metadata` →
  the request's metadata (the gateway's envelope, as a chat completion's); `stream` as it is.
- The gateway's own body extensions (`switchyard`, `policy`, `models`) are moved over.

Answer (Chat Completions → Responses): a `response` whose `output` is a `message` item with
one `output_text` part (when there is text) then one `function_call` item per tool call;
`finish_reason` → `status` (`incomplete` with its reason for `length` / `content_filter`);
usage as `topics.responses.responses_usage`. Streams: `EventWriter` turns
`chat.completion.chunk`s into the Responses stream events, each with its `sequence_number`."""

from __future__ import annotations

import time
from typing import Any

import orjson

from topics.errors import InvalidRequest
from topics.responses import (
    CALL_ITEM_PREFIX,
    MESSAGE_PREFIX,
    STATUS_OF_FINISH,
    new_id,
    responses_usage,
)

# Taken off the Responses body into the Chat Completions one: the gateway's extensions.
GATEWAY_FIELDS = ("switchyard", "policy", "models")
_ROLES = frozenset({"user", "assistant", "system", "developer"})
_CHOICES = frozenset({"auto", "none", "required"})


# --- requests ------------------------------------------------------------------------------


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's `input` as Chat Completions messages (checked as it is translated)."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise InvalidRequest("input must be a string or an array of items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_output(item, where))
        elif kind == "reasoning":
            continue  # past reasoning: no Chat Completions counterpart to send it as
        else:
            raise InvalidRequest(f"{where}: {kind!r} items cannot be translated for every "
                                 "route", param=f"{where}.type")
    return messages


def to_chat_body(body: dict[str, Any], history: list[dict[str, Any]],
                 new: list[dict[str, Any]]) -> dict[str, Any]:
    """The Chat Completions body for a Responses body (its required fields already checked
    by `ingress/responses.py`): `history` is the stored conversation of its
    `previous_response_id`, `new` its `input` as `input_messages` made it."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("instructions must be a string", param="instructions")
    messages.extend(history)
    messages.extend(new)
    if not messages:
        raise InvalidRequest("input must hold at least one item", param="input")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("stream"):
        chat["stream"] = True
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "user", "metadata"):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    if tools:
        chat["tools"] = tools
    if (choice := body.get("tool_choice")) is not None:
        chat["tool_choice"] = _tool_choice(choice)
    if body.get("parallel_tool_calls") is not None and chat.get("tools"):
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if (text := body.get("text")) is not None:
        _text_format(text, chat)
    for name in GATEWAY_FIELDS:
        if name in body:
            chat[name] = body[name]
    return chat


def _text_parts(content: object, where: str, role: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts",
                             param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part, dict):
            parts.append({"type": "text", "text": _string(part, "text", at)})
        elif kind == "refusal" and role == "assistant" and isinstance(part, dict):
            parts.append({"type": "text", "text": _string(part, "refusal", at)})
        elif kind == "input_image" and role == "user" and isinstance(part, dict):
            parts.append(_image(part, at))
        else:
            raise InvalidRequest(f"{at}: {kind!r} parts in {role} messages cannot be "
                                 "translated for every route", param=f"{at}.type")
    return parts


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{name} must be a string", param=f"{where}.{name}")
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequest(f"{where}.role must be user, assistant, system or developer",
                             param=f"{where}.role")
    content = _text_parts(item.get("content"), f"{where}.content", str(role))
    if role == "assistant" and isinstance(content, list):
        content = "".join(p["text"] for p in content)  # an assistant's content is text
    return {"role": role, "content": content}


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}.image_url must be a URL or a data URL (file_id images "
                             "cannot be translated)", param=f"{where}.image_url")
    image: dict[str, Any] = {"url": url}
    if part.get("detail") in ("low", "high", "auto"):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    return {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where),
                         "arguments": _string(item, "arguments", where)}}


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    output = item.get("output")
    if isinstance(output, list):
        output = "".join(_string(p, "text", f"{where}.output.{j}")
                         for j, p in enumerate(output)
                         if isinstance(p, dict) and p.get("type") in ("input_text",
                                                                        "output_text"))
    if not isinstance(output, str):
        raise InvalidRequest(f"{where}.output must be a string or text parts",
                             param=f"{where}.output")
    return {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": output}


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(f"{where}: {kind!r} tools cannot be translated for every "
                                 "route (function tools can)", param=f"{where}.type")
        function: dict[str, Any] = {"name": _string(tool, "name", where),
                                    "parameters": tool.get("parameters")
                                    or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if tool.get("strict") is True:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> str | dict[str, Any]:
    if isinstance(choice, str) and choice in _CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("tool_choice must be auto, none, required or a function "
                         "({\"type\": \"function\", \"name\": ...})", param="tool_choice")


def _text_format(text: object, chat: dict[str, Any]) -> None:
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema" and isinstance(fmt, dict) and isinstance(fmt.get("name"), str) \
            and isinstance(fmt.get("schema"), dict):
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    else:
        raise InvalidRequest("text.format must be text, json_object or json_schema (with a "
                             "name and a schema)", param="text.format")


# --- answers -------------------------------------------------------------------------------


def skeleton(body: dict[str, Any], response_id: str) -> dict[str, Any]:
    """The Response object of a request before its answer: what it echoes of the request."""
    tool_choice = body.get("tool_choice", "auto")
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": False, "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": body["model"],
        "output": [], "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": tool_choice, "tools": body.get("tools") or [],
        "truncation": body.get("truncation") or "disabled", "usage": None,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


def _text_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str,
               status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def finished(response: dict[str, Any], output: list[dict[str, Any]], finish: object,
             usage: dict[str, Any] | None, model: object) -> dict[str, Any]:
    """`response` (a skeleton) completed with its output, status and usage."""
    status, reason = STATUS_OF_FINISH.get(str(finish), ("completed", None))
    return {**response, "status": status, "output": output,
            "incomplete_details": {"reason": reason} if reason else None,
            "completed_at": int(time.time()) if status == "completed" else None,
            "model": str(model or response["model"]), "usage": responses_usage(usage)}


def to_response(response: dict[str, Any], completion: dict[str, Any]) -> dict[str, Any]:
    """The Response for a `chat.completion`, `response` being the request's skeleton."""
    choice = (completion.get("choices") or [{}])[0]
    answer = choice.get("message") or {}
    item_status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    output: list[dict[str, Any]] = []
    if answer.get("content"):
        output.append(_text_item(new_id(MESSAGE_PREFIX), str(answer["content"]), item_status))
    for call in answer.get("tool_calls") or ():
        function = call.get("function") or {}
        output.append(_call_item(new_id(CALL_ITEM_PREFIX), str(call.get("id") or ""),
                                 str(function.get("name") or ""),
                                 str(function.get("arguments") or ""), "completed"))
    return finished(response, output, choice.get("finish_reason"), completion.get("usage"),
                    completion.get("model"))


def assistant_turn(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Response's output as the Chat Completions assistant message a later turn sends."""
    text = "".join(part.get("text", "") for item in output if item.get("type") == "message"
                   for part in item.get("content") or ())
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item.get("type") == "function_call"]
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


# --- streams -------------------------------------------------------------------------------


class EventWriter:
    """`chat.completion.chunk`s in, the Responses stream events out, in its order:
    `response.created` and `response.in_progress` first; per output item `output_item.added`,
    its deltas (`content_part.added` and `output_text.delta` for text,
    `function_call_arguments.delta` for a tool call) and its closing events (…`.done`,
    `output_item.done`); at the end `response.completed` (or `response.incomplete`), or
    `response.failed`. An item is closed when the next one opens: the text, then each tool
    call, as the chunks bring them. Every event has the next `sequence_number`."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response  # the skeleton; the final Response once `end` ran
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # items closed or open, in order
        self._open: str | None = None  # "text", or "tool:<the chunk's tool call index>"
        self._calls: dict[str, dict[str, Any]] = {}  # function_call items by that key
        self._finish: object = None
        self._model: object = None

    def start(self) -> list[bytes]:
        return [self._event("response.created", {"response": self.response}),
                self._event("response.in_progress", {"response": self.response})]

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        self._model = self._model or chunk.get("model")
        out: list[bytes] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # one answer per response
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                out.extend(self._text_delta(text))
            for call in delta.get("tool_calls") or ():
                out.extend(self._tool_delta(call))
            if finish := choice.get("finish_reason"):
                self._finish = finish
        return out

    def end(self, usage: dict[str, Any] | None) -> list[bytes]:
        """The closing events; `self.response` is then the final Response."""
        out = self._close()
        self.response = finished(self.response, self._output, self._finish, usage,
                                 self._model)
        kind = "response.completed" if self.response["status"] == "completed" \
            else "response.incomplete"
        out.append(self._event(kind, {"response": self.response}))
        return out

    def fail(self, error: dict[str, Any]) -> bytes:
        """`response.failed`: the end of a stream whose answer failed after it started."""
        self.response = {**self.response, "status": "failed", "error": error,
                         "output": self._output}
        return self._event("response.failed", {"response": self.response})

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        event = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._output.append(item)
        out.append(self._event("response.output_item.added", {
            "output_index": len(self._output) - 1, "item": item}))
        return out

    def _text_delta(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open != "text":
            out.extend(self._add({**_text_item(new_id(MESSAGE_PREFIX), "", "in_progress"),
                                  "content": []}))
            self._open = "text"
            item = self._output[-1]
            item["content"].append(_text_part(""))
            out.append(self._event("response.content_part.added", {
                "item_id": item["id"], "output_index": len(self._output) - 1,
                "content_index": 0, "part": _text_part("")}))
        item = self._output[-1]
        item["content"][0]["text"] += text
        out.append(self._event("response.output_text.delta", {
            "item_id": item["id"], "output_index": len(self._output) - 1, "content_index": 0,
            "delta": text, "logprobs": []}))
        return out

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        key = f"tool:{call.get('index', 0)}"
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        out: list[bytes] = []
        if self._open != key:
            earlier = self._calls.get(key)
            if earlier is not None:
                # A delta of a call already closed (providers send calls one after the
                # other; this one did not): its arguments still reach the final Response.
                earlier["arguments"] += arguments
                return out
            out.extend(self._add(_call_item(new_id(CALL_ITEM_PREFIX), str(call.get("id") or ""),
                                            str(function.get("name") or ""), "",
                                            "in_progress")))
            self._open = key
            self._calls[key] = self._output[-1]
        item = self._output[-1]
        if arguments:
            item["arguments"] += arguments
            out.append(self._event("response.function_call_arguments.delta", {
                "item_id": item["id"], "output_index": len(self._output) - 1,
                "delta": arguments}))
        return out

    def _close(self) -> list[bytes]:
        """The closing events of the open item, if one is."""
        if self._open is None:
            return []
        index = len(self._output) - 1
        item = self._output[index]
        self._open = None
        out: list[bytes] = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "text": part["text"], "logprobs": []}))
            out.append(self._event("response.content_part.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "part": part}))
            item["status"] = "incomplete" if self._finish == "length" else "completed"
        else:
            out.append(self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"],
                "arguments": item["arguments"]}))
            item["status"] = "completed"
        out.append(self._event("response.output_item.done", {
            "output_index": index, "item": item}))
        return out
