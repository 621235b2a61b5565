"""Every body that breaks its model gets the same documented 422, wherever it was sent."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from ingress.validation import parse_body, parse_model
from topics.errors import InvalidRequest, Unprocessable


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    cost: float = Field(default=1.0, ge=0)
    latency: float = 1.0


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    secret: str = Field(min_length=8)
    inner: Inner = Inner()
    tags: dict[str, int] = Field(default_factory=dict)


def _refused(model: type[BaseModel], data: object, prefix: str | None = None) -> Unprocessable:
    with pytest.raises(Unprocessable) as caught:
        parse_model(model, data, prefix=prefix)
    assert caught.value.status == 422
    return caught.value


def test_a_missing_field_is_named_and_coded_missing_field() -> None:
    error = _refused(Outer, {})
    assert (error.code, error.param, error.message) == (
        "missing_field", "secret", "secret: is required")


def test_a_wrong_nested_value_is_named_by_its_dotted_path() -> None:
    error = _refused(Outer, {"secret": "long enough", "inner": {"cost": -1}})
    assert (error.code, error.param) == ("invalid_field", "inner.cost")
    assert error.message.startswith("inner.cost: ")


def test_an_unknown_field_lists_the_fields_that_would_have_been_right() -> None:
    error = _refused(Outer, {"secret": "long enough", "inner": {"speed": 1}})
    assert error.param == "inner.speed"
    assert error.message == "inner.speed: unknown field; expected one of cost, latency"


def test_a_bad_dict_key_or_value_names_the_key() -> None:
    assert _refused(Outer, {"secret": "long enough", "tags": {"a": "x"}}).param == "tags.a"


def test_several_problems_are_counted_after_the_first() -> None:
    assert _refused(Outer, {"secret": 5, "inner": 3}).message.endswith("(1 more problems)")


def test_a_section_of_the_body_is_named_with_its_prefix() -> None:
    error = _refused(Inner, {"cost": "high"}, prefix="policy")
    assert error.param == "policy.cost"
    not_object = _refused(Inner, "fast", prefix="policy")
    assert (not_object.param, not_object.message) == ("policy", "policy must be an object")


def test_the_input_is_never_echoed() -> None:
    """A body may carry a secret (a provider key sent to the vault)."""
    error = _refused(Outer, {"secret": "sk-short"[:6]})
    assert "sk-sho" not in error.message
    assert error.param == "secret"


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    for raw in (b"{", b"[1, 2]", b'"text"'):
        with pytest.raises(InvalidRequest) as caught:
            parse_body(Outer, raw)
        assert caught.value.code == "invalid_json"
