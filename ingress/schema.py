"""What a chat-completions body must look like before it is accepted onto Kafka. Only the
checks live here; the body travels as the client sent it, unknown fields included."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ingress.validation import parse_model
from topics.anthropic import NATIVE
from topics.errors import InvalidRequest, PayloadTooLarge, Unprocessable


class _Open(BaseModel):
    # strict: "stream": "yes" is a mistake to report, not a truthy string to coerce
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str
    image_url: dict[str, Any] | None = None


class FunctionDef(_Open):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


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
    tools: list[Tool] | None = None


def validate_chat(body: dict[str, Any], max_image_bytes: int) -> ChatCompletionRequest:
    if NATIVE in body:
        # Set by the Messages ingress only: an Anthropic route would send it as it is.
        raise InvalidRequest(f"{NATIVE} is reserved for the gateway", param=NATIVE)
    request = parse_model(ChatCompletionRequest, body)
    for i, tool in enumerate(request.tools or ()):
        schema = tool.function.parameters
        if schema is not None and (schema.get("type") != "object"
                                   or not isinstance(schema.get("properties", {}), dict)):
            raise Unprocessable("a function's parameters must be a JSON Schema of type "
                                "'object' with a 'properties' object",
                                code="invalid_tool_schema", param=f"tools.{i}.function.parameters")
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            url = (part.image_url or {}).get("url")
            if isinstance(url, str) and url.startswith("data:"):
                # base64 carries 3 bytes in 4 characters
                size = len(url.partition(",")[2]) * 3 // 4
                if size > max_image_bytes:
                    raise PayloadTooLarge(
                        f"image of {size} bytes is over the {max_image_bytes}-byte limit",
                        code="image_too_large", param=f"messages.{i}.content.{j}.image_url")
    return request


class EmbeddingsRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


def validate_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    request = parse_model(EmbeddingsRequest, body)
    if isinstance(request.input, list) and not all(request.input):
        raise Unprocessable("input: every item must be a non-empty string",
                            code="invalid_field", param="input")
    return request
