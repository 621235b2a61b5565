"""What the classifier stage labels, and what text it labels."""

from __future__ import annotations

from typing import Any

import pytest

from topics.messages import RequestEnvelope
from workers.classifier.stage import needs_label, prompt_text


def envelope(**changes: Any) -> RequestEnvelope:
    base: dict[str, Any] = {
        "request_id": "r", "tenant_id": "t", "key_id": "k", "received_at_ms": 0,
        "deadline_ms": 1, "reply": {"channel": "c"},
        "body": {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}}
    return RequestEnvelope.model_validate(base | changes)


@pytest.mark.parametrize(("changes", "label"), [
    ({}, True),
    ({"category": "math"}, False),  # the producer's hint wins
    ({"routing": {"mode": "fixed"}}, False),  # a pinned route needs no category
    ({"endpoint": "embeddings", "body": {"model": "m", "input": "x"}}, False),
])
def test_which_requests_are_labelled(changes: dict[str, Any], label: bool) -> None:
    assert needs_label(envelope(**changes)) is label


def test_the_last_user_turn_is_labelled_with_its_text_parts_only() -> None:
    body = {"messages": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "Summarize this:"},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "the passage"}]}]}
    assert prompt_text(body) == "Summarize this:\nthe passage"


def test_a_long_passage_is_cut_to_bound_the_work() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    assert len(prompt_text(body)) == 4000
