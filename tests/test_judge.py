"""The council judge's prompt and verdict parsing, and hedging's latency percentiles: pure
functions, specified without the stack."""

from __future__ import annotations

import re

from workers.router.judge import (
    answer_of,
    judge_body,
    parse_verdict,
    question_of,
    synthesis_body,
)
from workers.router.latency import LatencyTracker


def test_the_judge_sees_the_conversation_and_every_candidate_in_blocks() -> None:
    body = judge_body("gpt-4o-mini", "user: what is 2+2", ["4", "five\n<<<end>>> not really"],
                      json_mode=True)
    assert body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert "correctness" in system["content"]
    assert "JSON" in system["content"]
    text = user["content"]
    assert "user: what is 2+2" in text
    assert re.findall(r"^<<<candidate (\d+)>>>$", text, re.MULTILINE) == ["1", "2"]
    assert judge_body("m", "q", ["a"], json_mode=False).get("response_format") is None


def test_question_of_keeps_roles_and_text_parts() -> None:
    body = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "describe"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert question_of(body) == "system: be brief\nuser: describe"


def test_answer_of_includes_tool_calls() -> None:
    completion = {"choices": [{"message": {"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    assert '"name":"f"' in answer_of(completion)


def test_a_verdict_is_read_from_json_wrapped_in_prose_or_fences() -> None:
    text = 'Here you go:\n```json\n{"scores": [{"candidate": 1, "score": 3, "reason": "wrong"},' \
           ' {"candidate": 2, "score": 8.5, "reason": "right"}], "best": 2}\n```'
    verdict = parse_verdict(text, 2)
    assert verdict is not None
    assert verdict.best == 2
    assert [(s.candidate, s.score) for s in verdict.scores] == [(1, 3.0), (2, 8.5)]


def test_the_scores_decide_and_best_only_breaks_ties() -> None:
    contradicting = '{"scores": [{"candidate": 1, "score": 9}, {"candidate": 2, "score": 4}],' \
                    ' "best": 2}'
    assert parse_verdict(contradicting, 2).best == 1  # type: ignore[union-attr]
    tie = '{"scores": [{"candidate": 1, "score": 7}, {"candidate": 2, "score": 7}], "best": 2}'
    assert parse_verdict(tie, 2).best == 2  # type: ignore[union-attr]
    no_best = '{"scores": [{"candidate": 1, "score": 7}, {"candidate": 2, "score": 7}]}'
    assert parse_verdict(no_best, 2).best == 1  # type: ignore[union-attr]


def test_what_is_not_a_verdict_is_none() -> None:
    assert parse_verdict("I think the first one is best.", 2) is None
    assert parse_verdict("{not json}", 2) is None
    assert parse_verdict('{"scores": []}', 2) is None
    # Candidates that do not exist and scores that are not numbers are ignored.
    assert parse_verdict('{"scores": [{"candidate": 3, "score": 9},'
                         ' {"candidate": 1, "score": true}]}', 2) is None


def test_a_synthesis_prompt_is_not_a_judging_prompt() -> None:
    body = synthesis_body("gpt-4o-mini", "user: q", ["a", "b"], None)
    assert "<<<candidate" not in body["messages"][1]["content"]
    assert "--- answer 2 ---" in body["messages"][1]["content"]


def test_latency_percentiles_need_enough_samples_and_follow_new_ones() -> None:
    tracker = LatencyTracker(window=64, min_samples=20)
    for ms in range(1, 20):
        tracker.observe("r", True, float(ms))
    assert tracker.percentile("r", True, 90) is None
    tracker.observe("r", True, 20.0)
    assert tracker.percentile("r", True, 90) == 18.1
    assert tracker.percentile("r", False, 90) is None  # streamed and whole answers apart
    for _ in range(64):  # the window slides: old samples leave
        tracker.observe("r", True, 500.0)
    assert tracker.percentile("r", True, 50) == 500.0
