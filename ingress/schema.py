"""What a chat-completions body must look like before it is accepted onto Kafka. Only the
checks live here; the body travels as the client sent it, unknown fields included."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from topics.errors import InvalidRequest, Unprocessable


class _Open(BaseModel):
    # strict: "stream": "yes" is a mistake to report, not a truthy string to coerce
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)  # several choices are not relayed yet


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    return body


def validate_chat(body: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _unprocessable(exc) from None


def _unprocessable(exc: ValidationError) -> Unprocessable:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    missing = first["type"] == "missing"
    return Unprocessable(
        f"{param}: {'is required' if missing else first['msg']}"
        + (f" ({exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""),
        code="missing_field" if missing else "invalid_field", param=param)


class EmbeddingsRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


def validate_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    try:
        request = EmbeddingsRequest.model_validate(body)
    except ValidationError as exc:
        raise _unprocessable(exc) from None
    if isinstance(request.input, list) and not all(request.input):
        raise Unprocessable("input: every item must be a non-empty string",
                            code="invalid_field", param="input")
    return request
