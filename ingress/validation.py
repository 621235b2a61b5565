"""Request bodies into typed models, and every validation failure into the one documented 422.

A body that is not a JSON object is a 400 `invalid_json`. A body that is JSON but breaks its
model is a 422 whose `param` names the first field at fault (dotted, e.g. `weights.cost` or
`messages.0.role`), whose `code` is `missing_field` or `invalid_field`, and whose message is
`<param>: <reason>`, with the count of further problems when there are several. The input is
never echoed: a body may carry a secret (a provider key sent to the vault).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from topics.errors import InvalidRequest, Unprocessable

M = TypeVar("M", bound=BaseModel)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    return body


def parse_model(model: type[M], data: object, *, prefix: str | None = None) -> M:
    """`data` as `model`, or the 422 for its first problem. `prefix` names where `data` sits
    in the body (`policy`, `switchyard`); a `data` that is not an object is refused as that
    field."""
    if prefix is not None and not isinstance(data, dict):
        raise Unprocessable(f"{prefix} must be an object", code="invalid_field", param=prefix)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise unprocessable(exc, model, prefix) from None


def parse_body(model: type[M], raw: bytes) -> M:
    """A whole request body as `model`: 400 if it is not a JSON object, else as
    `parse_model`."""
    return parse_model(model, parse_json_object(raw))


def unprocessable(exc: ValidationError, model: type[BaseModel] | None = None,
                  prefix: str | None = None) -> Unprocessable:
    errors = exc.errors(include_input=False, include_url=False)
    first = errors[0]
    # Pydantic marks a bad dict key with a trailing "[key]": the key itself names the field.
    loc = [str(p) for p in first["loc"] if p != "[key]"]
    param = ".".join([prefix, *loc] if prefix else loc) or prefix or "body"
    missing = first["type"] == "missing"
    more = f" ({len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return Unprocessable(f"{param}: {_reason(first, model, loc)}{more}",
                         code="missing_field" if missing else "invalid_field", param=param)


def _reason(error: ErrorDetails, model: type[BaseModel] | None, loc: list[str]) -> str:
    if error["type"] == "missing":
        return "is required"
    if error["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1]) if model is not None else None
        return f"unknown field; expected one of {', '.join(known)}" if known \
            else "unknown field"
    return error["msg"].removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str] | None:
    """The field names of the (nested) model at `path`, when the path leads through model
    fields only."""
    for name in path:
        field = model.model_fields.get(name)
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return list(model.model_fields)
