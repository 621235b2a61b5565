"""OpenAI Chat Completions request → Gemini `generateContent` request, and the tool-call ids
both directions share.

Each OpenAI parameter is translated, accepted as a label that cannot change the answer, or
refused with `unsupported`: nothing is dropped silently. JSON Schemas go to Gemini's JSON Schema
fields (`parametersJsonSchema`, `responseJsonSchema`) within the keywords the API reference lists
for them; any other keyword is refused, since Gemini would ignore the constraint it states."""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import re
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from topics.anthropic import without_native
from topics.errors import InvalidRequest
from workers.providers.errors import unsupported

# Parameters with a Gemini translation (or, like `model` and `stream`, consumed by the adapter).
_TRANSLATED = frozenset({"model", "messages", "stream", "stream_options", "temperature", "top_p",
                         "max_tokens", "max_completion_tokens", "n", "stop", "seed", "logprobs",
                         "presence_penalty", "frequency_penalty", "top_logprobs", "tools",
                         "tool_choice", "response_format", "reasoning_effort"})
# End-user and cache-routing labels for OpenAI's monitoring: accepted, never forwarded.
_LABELS = frozenset({"user", "safety_identifier", "prompt_cache_key"})
# Accepted only at the value that means "OpenAI's default", which is also Gemini's behaviour.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {"parallel_tool_calls": (True,), "store": (False,),
                                              "service_tier": ("auto", "default"),
                                              "modalities": (["text"],)}
_WHY = {"logit_bias": "Gemini has no token bias", "functions": "deprecated; use tools",
        "function_call": "deprecated; use tool_choice", "store": "Gemini stores nothing",
        "parallel_tool_calls": "Gemini cannot be limited to one call per turn",
        "audio": "audio output is not relayed", "modalities": "only text output is relayed",
        "prediction": "Gemini has no predicted outputs", "verbosity": "Gemini has no verbosity",
        "web_search_options": "web search is not translated",
        "service_tier": "Gemini service tiers are not translated"}
_EFFORT = {"minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH",
           "xhigh": "XHIGH"}
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/heic",
                          "image/heif"})
_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}
# Gemini's rule for function names (OpenAI's is narrower, so this only catches bad input).
_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")
# The JSON Schema keywords the reference lists for responseJsonSchema (and the example of
# parametersJsonSchema stays within): anything else constrains what Gemini would not enforce.
_SCHEMA_KEYWORDS = frozenset({"$id", "$defs", "$ref", "$anchor", "type", "format", "title",
                              "description", "enum", "items", "prefixItems", "minItems",
                              "maxItems", "minimum", "maximum", "anyOf", "oneOf", "properties",
                              "additionalProperties", "required", "propertyOrdering"})
# Annotations: they describe, never constrain, so leaving them out changes no valid output.
_ANNOTATIONS = frozenset({"$schema", "$comment", "examples", "default", "readOnly",
                          "writeOnly", "deprecated"})
# Gemini 3 rejects a replayed function call without the signature it issued; this documented
# placeholder stands in when the call came from elsewhere (another provider, an edited history).
SKIP_SIGNATURE = "skip_thought_signature_validator"
_CALL_ID = re.compile(r"(call_[0-9a-f]{24})(?:_s([A-Za-z0-9_-]+))?")


def make_call_id(seed: str, signature: str | None) -> str:
    """A stable OpenAI tool-call id. Gemini may give no id, so it is a hash of where the call
    sits in the answer; the call's thought signature rides along (base64url, so the id stays
    within [A-Za-z0-9_-]) because the client's replayed history is the only place to keep it."""
    base = "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24]
    if not signature:
        return base
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return base  # not base64: it cannot round-trip; the placeholder will stand in
    return f"{base}_s{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """(the id Gemini sees, the thought signature) of an OpenAI tool-call id."""
    match = _CALL_ID.fullmatch(call_id)
    if match is None:
        return call_id, None  # an id minted elsewhere: passed as it is
    try:
        raw = base64.urlsafe_b64decode((match[2] or "") + "=" * (-len(match[2] or "") % 4))
    except (binascii.Error, ValueError):
        raw = b""  # a mangled signature: the placeholder will stand in
    return match[1], base64.b64encode(raw).decode() if raw else None


def to_gemini(provider: str, body: dict[str, Any]) -> dict[str, Any]:
    """The `generateContent` request body for an OpenAI Chat Completions body (a Messages
    client's native Anthropic request is left out: `topics/anthropic.py`)."""
    body = without_native(body)
    _check_params(provider, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    system, contents = _contents(provider, messages)
    payload: dict[str, Any] = {"contents": contents}
    if system:
        payload["systemInstruction"] = {"parts": system}
    strict = False
    if tools := body.get("tools"):
        declarations, strict = _declarations(provider, tools)
        payload["tools"] = [{"functionDeclarations": declarations}]
    if (config := _tool_config(provider, body.get("tool_choice"), strict)) is not None:
        payload["toolConfig"] = {"functionCallingConfig": config}
    if generation := _generation_config(provider, body):
        payload["generationConfig"] = generation
    return payload


def _check_params(provider: str, body: dict[str, Any]) -> None:
    for key, value in body.items():
        if not (key in _TRANSLATED or key in _LABELS or value is None
                or value in _DEFAULT_ONLY.get(key, ())):
            raise unsupported(provider, key, _WHY.get(key, "it has no Gemini translation"))


def _contents(provider: str, messages: list[Any]) -> tuple[list[dict[str, Any]],
                                                            list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool-call id → function name, from the assistant turns
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if msg.get("name") is not None:
            raise unsupported(provider, f"{where}.name", "Gemini has no participant names")
        role = msg.get("role")
        if role in ("system", "developer"):
            # Gemini has one system instruction: every system message joins it, in order.
            system += [{"text": t} for t in _texts(provider, msg.get("content"), where)]
        elif role == "user":
            contents.append({"role": "user",
                             "parts": _user_parts(provider, msg.get("content"), where)})
        elif role == "assistant":
            if parts := _model_parts(provider, msg, where, names):
                contents.append({"role": "model", "parts": parts})
        elif role == "tool":
            part = _function_response(msg, where, names)
            last = contents[-1] if contents else None
            # Parallel calls' results travel together, in one turn, as Gemini expects.
            if last and last["role"] == "user" and all("functionResponse" in p
                                                         for p in last["parts"]):
                last["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part]})
        elif role == "function":
            raise unsupported(provider, f"{where}.role", _WHY["functions"])
        else:
            raise InvalidRequest(f"{where}.role {role!r} is not a chat role", param=where)
    return system, contents


def _texts(provider: str, content: Any, where: str) -> list[str]:
    """The texts of content that may only hold text (system, tool, assistant)."""
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "refusal"):
            raise unsupported(provider, f"{where}.content[{j}].type",
                              f"{kind!r} parts are only accepted in user messages")
        texts.append(str(part.get(kind) or ""))
    return texts


def _user_parts(provider: str, content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"{where}.content must be a string or a non-empty array",
                             param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"text": str(part.get("text") or "")})
        elif kind == "image_url":
            parts.append(_image(provider, part.get("image_url") or {}, at))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            mime = _AUDIO_TYPES.get(str(audio.get("format")))
            if mime is None:
                raise unsupported(provider, f"{at}.input_audio.format", "use wav or mp3")
            parts.append({"inlineData": {"mimeType": mime, "data": str(audio.get("data"))}})
        elif kind == "file":
            file = part.get("file") or {}
            if file.get("file_id") is not None:
                raise unsupported(provider, f"{at}.file.file_id",
                                  "OpenAI file ids cannot be read by Gemini; send file_data")
            parts.append({"inlineData": _data_url(provider, str(file.get("file_data") or ""),
                                                  f"{at}.file.file_data")})
        else:
            raise unsupported(provider, f"{at}.type", f"{kind!r} parts have no translation")
    return parts


def _image(provider: str, image: dict[str, Any], at: str) -> dict[str, Any]:
    if image.get("detail") not in (None, "auto"):
        raise unsupported(provider, f"{at}.image_url.detail",
                          "Gemini's v1beta API has no per-image resolution")
    url = str(image.get("url") or "")
    if url.startswith("data:"):
        return {"inlineData": _data_url(provider, url, f"{at}.image_url.url")}
    parsed = urlsplit(url)
    if parsed.scheme != "https":
        # Gemini fetches external files over HTTPS only (public or signed URLs).
        raise unsupported(provider, f"{at}.image_url.url", "send a data URL or an https URL")
    mime = mimetypes.guess_type(parsed.path)[0]
    if mime not in _IMAGE_TYPES:
        # fileData needs the MIME type, and a URL without a known image extension hides it.
        raise unsupported(provider, f"{at}.image_url.url",
                          "the image type cannot be told from the URL; send a data URL")
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _data_url(provider: str, url: str, at: str) -> dict[str, str]:
    head, comma, data = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64") or not comma:
        raise unsupported(provider, at, "only base64 data URLs are accepted")
    return {"mimeType": head[5:-7], "data": data}


def _model_parts(provider: str, msg: dict[str, Any], where: str,
                 names: dict[str, str]) -> list[dict[str, Any]]:
    for field in ("audio", "function_call"):
        if msg.get(field) is not None:
            raise unsupported(provider, f"{where}.{field}", _WHY[field])
    texts = [*_texts(provider, msg.get("content"), where), str(msg.get("refusal") or "")]
    parts: list[dict[str, Any]] = [{"text": t} for t in texts if t]
    first_call = True
    for k, call in enumerate(msg.get("tool_calls") or ()):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise InvalidRequest(f"{at} must be a function tool call", param=at)
        function = call["function"]
        if call.get("type", "function") != "function":
            raise unsupported(provider, at, "only function tool calls have a translation")
        call_id, signature = split_call_id(str(call.get("id") or ""))
        name = str(function.get("name") or "")
        names[str(call.get("id"))] = name
        try:
            args = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise InvalidRequest(f"{at}.function.arguments must be a JSON object",
                                 param=f"{at}.function.arguments")
        part: dict[str, Any] = {"functionCall": {"id": call_id, "name": name, "args": args}}
        if signature or first_call:
            part["thoughtSignature"] = signature or SKIP_SIGNATURE
        first_call = False
        parts.append(part)
    return parts


def _function_response(msg: dict[str, Any], where: str,
                       names: dict[str, str]) -> dict[str, Any]:
    raw_id = str(msg.get("tool_call_id") or "")
    name = names.get(raw_id)
    if name is None:
        raise InvalidRequest(f"{where}.tool_call_id {raw_id!r} answers no earlier tool call; "
                             "Gemini needs the called function's name",
                             code="unknown_tool_call_id", param=f"{where}.tool_call_id")
    content = msg.get("content")
    text = content if isinstance(content, str) else "".join(
        str(p.get("text") or "") for p in content or () if isinstance(p, dict))
    try:
        value: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    # `response` must be an object; Gemini reads a non-object result under "output".
    response = value if isinstance(value, dict) else {"output": value}
    return {"functionResponse": {"id": split_call_id(raw_id)[0], "name": name,
                                 "response": response}}


def _declarations(provider: str, tools: Any) -> tuple[list[dict[str, Any]], bool]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", param="tools")
    declarations, strict = [], False
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise unsupported(provider, f"{at}.type", "only function tools have a translation")
        name = str(function.get("name") or "")
        if not _FUNCTION_NAME.fullmatch(name):
            raise unsupported(provider, f"{at}.function.name",
                              "Gemini names start with a letter or _ and use [A-Za-z0-9_.:-]")
        declaration: dict[str, Any] = {"name": name}
        if function.get("description") is not None:
            declaration["description"] = str(function["description"])
        if function.get("parameters") is not None:
            declaration["parametersJsonSchema"] = json_schema(
                provider, function["parameters"], f"{at}.function.parameters")
        strict = strict or function.get("strict") is True
        declarations.append(declaration)
    return declarations, strict


def _tool_config(provider: str, choice: Any, strict: bool) -> dict[str, Any] | None:
    # VALIDATED is Gemini's schema-adherent AUTO: the translation of OpenAI's `strict`.
    auto = "VALIDATED" if strict else "AUTO"
    if choice is None:
        return {"mode": auto} if strict else None
    if choice in ("auto", "none", "required"):
        return {"mode": {"auto": auto, "none": "NONE", "required": "ANY"}[choice]}
    try:
        if choice.get("type") == "function":
            return {"mode": "ANY", "allowedFunctionNames": [str(choice["function"]["name"])]}
        if choice.get("type") == "allowed_tools":
            allowed = choice["allowed_tools"]
            names = [str(t["function"]["name"]) for t in allowed["tools"]]
            mode = {"auto": "VALIDATED", "required": "ANY"}.get(allowed.get("mode"))
            if mode is not None:
                return {"mode": mode, "allowedFunctionNames": names}
    except (AttributeError, KeyError, TypeError):
        raise InvalidRequest("tool_choice is malformed", param="tool_choice") from None
    raise unsupported(provider, "tool_choice", "no Gemini function-calling mode matches it")


def _generation_config(provider: str, body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                         ("n", "candidateCount"), ("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("logprobs"):
        config["responseLogprobs"] = True
        if body.get("top_logprobs") is not None:
            config["logprobs"] = body["top_logprobs"]
    elif body.get("top_logprobs") is not None:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    effort = body.get("reasoning_effort")
    if effort == "none":
        config["thinkingConfig"] = {"thinkingBudget": 0}
    elif effort in _EFFORT:
        config["thinkingConfig"] = {"thinkingLevel": _EFFORT[effort]}
    elif effort is not None:
        raise unsupported(provider, "reasoning_effort", f"{effort!r} has no thinking level")
    config.update(_response_format(provider, body.get("response_format")))
    return config


def _response_format(provider: str, fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind in (None, "text"):
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema" and isinstance(fmt, dict):
        spec = fmt.get("json_schema") or {}
        if not isinstance(spec.get("schema"), dict):
            raise InvalidRequest("response_format.json_schema.schema must be an object",
                                 param="response_format.json_schema.schema")
        schema = json_schema(provider, spec["schema"], "response_format.json_schema.schema")
        if spec.get("description") and "description" not in schema:
            # OpenAI shows the model this description; the schema is where Gemini looks.
            schema["description"] = str(spec["description"])
        return {"responseMimeType": "application/json", "responseJsonSchema": schema}
    raise unsupported(provider, "response_format", f"type {kind!r} has no translation")


def json_schema(provider: str, schema: Any, where: str) -> dict[str, Any]:
    """`schema` within the JSON Schema subset Gemini takes, or the refusal naming what not."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON Schema object", param=where)
    if "definitions" in schema:  # the draft-07 spelling of $defs
        if "$defs" in schema:
            raise unsupported(provider, f"{where}.definitions", "use $defs alone")
        schema = {("$defs" if k == "definitions" else k): v for k, v in schema.items()}
    return cast(dict[str, Any], _schema_node(provider, schema, where))


def _schema_node(provider: str, node: Any, where: str) -> Any:
    if isinstance(node, bool):
        return node  # the true/false schemas, e.g. additionalProperties: false
    if not isinstance(node, dict):
        raise InvalidRequest(f"{where} must be a JSON Schema", param=where)
    out: dict[str, Any] = {}
    for key, value in node.items():
        at = f"{where}.{key}"
        if key in _ANNOTATIONS:
            continue
        if key == "const":
            key, value = "enum", [value]  # the same constraint, in a keyword Gemini takes
        elif key not in _SCHEMA_KEYWORDS:
            raise unsupported(provider, at, f"Gemini does not take the JSON Schema keyword "
                                            f"{key!r}")
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {n: _schema_node(provider, s, f"{at}.{n}") for n, s in value.items()}
        elif key in ("anyOf", "oneOf", "prefixItems") or (key == "items"
                                                         and isinstance(value, list)):
            # A list under `items` is draft-07's tuple form, which Gemini spells prefixItems.
            out["prefixItems" if key == "items" else key] = [
                _schema_node(provider, s, f"{at}[{n}]") for n, s in enumerate(value)]
        elif key in ("items", "additionalProperties"):
            out[key] = _schema_node(provider, value, at)
        elif key == "enum":
            if not isinstance(value, list) or not all(
                    isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
                raise unsupported(provider, at, "Gemini takes enum values of strings and "
                                                "numbers only")
            out[key] = value
        elif key == "$ref":
            out[key] = re.sub(r"^#/definitions/", "#/$defs/", str(value))
        else:
            out[key] = value
    siblings = {k: v for k, v in out.items() if not k.startswith("$")}
    if "$ref" in out and siblings:
        # Beside $ref Gemini takes only $-keywords; a one-branch anyOf means the same thing.
        if "anyOf" in siblings:
            raise unsupported(provider, f"{where}.$ref", "$ref beside anyOf")
        dollars = {k: v for k, v in out.items() if k.startswith("$") and k != "$ref"}
        out = {**dollars, **siblings, "anyOf": [{"$ref": out["$ref"]}]}
    return out
