"""The council's judge, as text: the prompt that asks a model to score the members' answers
against a rubric, the parse of its verdict, and the synthesis prompt. Pure functions.

The prompt is a contract (the fake judge in `compose/fake_judge.py` reads it): each candidate
sits between a line `<<<candidate N>>>` and a line `<<<end>>>`, and the verdict is a JSON
object `{"scores": [{"candidate": N, "score": 0..10, "reason": "..."}], "best": N}`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

RUBRIC = """You are the judge of a council of AI assistants. Several assistants answered the \
same request; score each answer from 0 to 10:
- correctness (most weight): facts, reasoning, code and arithmetic are right;
- completeness: it does everything the request asks, no more;
- instruction following: format, length and constraints stated in the request are met.
Do not reward length or confidence. Judge each answer on its own merits; the candidates' \
order means nothing.
Reply with JSON only, in exactly this shape:
{"scores": [{"candidate": 1, "score": 7, "reason": "one short sentence"}, ...], "best": 1}"""

SYNTHESIS = """You are combining the answers of several AI assistants to the same request \
into one answer. Keep what is correct in each, drop what is wrong, and answer the request \
directly, as if you were answering it alone. Do not mention the assistants or this process."""

_QUESTION_CHARS = 20_000  # the judge needs the request, not a 200k-token paste of it


@dataclass(frozen=True, slots=True)
class Score:
    candidate: int  # 1-based, in the order the judge was shown
    score: float
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    scores: tuple[Score, ...]
    best: int  # 1-based


def question_of(body: dict[str, Any]) -> str:
    """The request as the judge sees it: every message, role by role."""
    lines = []
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            lines.append(f"{message.get('role', 'user')}: {_text(message.get('content'))}")
    return "\n".join(lines)[-_QUESTION_CHARS:]


def answer_of(completion: dict[str, Any]) -> str:
    """A completion's answer as text (its tool calls, if any, as JSON)."""
    choices = completion.get("choices") or [{}]
    message = choices[0].get("message") or {}
    text = _text(message.get("content"))
    if message.get("tool_calls"):
        text += ("\n" if text else "") + orjson.dumps(message["tool_calls"]).decode()
    return text


def judge_body(judge_model: str, question: str, answers: list[str],
               json_mode: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": judge_model, "temperature": 0,
        "messages": [{"role": "system", "content": RUBRIC},
                     {"role": "user", "content": _candidates(question, answers)}]}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    return body


def synthesis_body(model: str, question: str, answers: list[str],
                   verdict: Verdict | None) -> dict[str, Any]:
    scores = "" if verdict is None else "\nThe judge's scores: " + ", ".join(
        f"answer {s.candidate}: {s.score:g}/10" for s in verdict.scores)
    # Numbered as "answer N", not in candidate blocks: this is not a request to judge.
    listing = "\n\n".join(f"--- answer {i} ---\n{a}" for i, a in enumerate(answers, 1))
    return {"model": model, "messages": [
        {"role": "system", "content": SYNTHESIS},
        {"role": "user", "content": f"The request:\n{question}\n\n{listing}{scores}"}]}


def parse_verdict(text: str, candidates: int) -> Verdict | None:
    """The judge's verdict, or None if it is not one (then the caller falls back)."""
    document = _json_object(text)
    if document is None:
        return None
    scores: dict[int, Score] = {}
    for item in document.get("scores") or ():
        if not isinstance(item, dict):
            continue
        n, score = item.get("candidate"), item.get("score")
        if type(n) is int and 1 <= n <= candidates and isinstance(score, int | float) \
                and not isinstance(score, bool):
            scores[n] = Score(n, float(score), str(item.get("reason") or "")[:500])
    if not scores:
        return None
    ordered = tuple(scores[n] for n in sorted(scores))
    # The scores decide; `best` only breaks a tie (a judge's prose and numbers can disagree).
    top = max(s.score for s in ordered)
    tied = [s.candidate for s in ordered if s.score == top]
    best = document.get("best")
    return Verdict(ordered, best if best in tied else tied[0])


def _candidates(question: str, answers: list[str]) -> str:
    blocks = "\n".join(f"<<<candidate {i}>>>\n{answer}\n<<<end>>>"
                       for i, answer in enumerate(answers, 1))
    return f"The request:\n{question}\n\nThe candidate answers:\n{blocks}"


def _json_object(text: str) -> dict[str, Any] | None:
    # Models wrap JSON in prose or code fences even when told not to.
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        return None
    try:
        document = orjson.loads(match.group(0))
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") == "text")
    return ""
