"""Council mode: N routes answer the same request, a judge model scores each answer against a
rubric, and the best one (or, by policy, a synthesis of them) is returned with every member's
score and cost in `metadata.council`.

Members that fail or outlast the member timeout are dropped while a quorum remains. If the
judge fails or says nothing usable, the bandit's favourite among the answers is returned and
`metadata.council.judge.status` says so: the client paid for those answers. A streamed
council sends SSE comments while members work (progress frames), then the chosen answer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from topics.catalog import Model
from topics.errors import SwitchyardError, UpstreamError
from topics.messages import RequestEnvelope
from topics.settings import RouterSettings
from workers.router.attempt import AttemptRunner, Lead, Report
from workers.router.decide import Decision
from workers.router.frames import FrameWriter
from workers.router.judge import (
    Verdict,
    answer_of,
    judge_body,
    parse_verdict,
    question_of,
    synthesis_body,
)
from workers.router.metrics import RouterMetrics
from workers.router.routes import RouteResolver


@dataclass(frozen=True, slots=True)
class CouncilSettings:
    quorum: int  # answers needed for a verdict (fewer members: all of them)
    member_timeout_s: float
    judge_timeout_s: float
    progress_every_s: float

    @classmethod
    def from_settings(cls, router: RouterSettings) -> CouncilSettings:
        return cls(quorum=router.council_quorum,
                   member_timeout_s=router.council_member_timeout_s,
                   judge_timeout_s=router.council_judge_timeout_s,
                   progress_every_s=router.council_progress_every_s)


class Council:
    def __init__(self, runner: AttemptRunner, resolver: RouteResolver,
                 settings: CouncilSettings, metrics: RouterMetrics | None = None) -> None:
        self._runner = runner
        self._resolver = resolver
        self._settings = settings
        self._metrics = metrics

    def _stage(self, stage: str) -> None:
        if self._metrics is not None:
            self._metrics.council_stages.labels(stage).inc()

    async def run(self, env: RequestEnvelope, decision: Decision, out: FrameWriter) -> None:
        assert decision.judge is not None  # the decider refuses a council without a judge
        t0 = time.perf_counter()
        streamed = bool(env.body.get("stream"))
        members = decision.ranked[:decision.width]
        self._stage("members")
        reports = await self._members(env, decision, members, out if streamed else None)
        answered = [r for r in reports if r.status == "ok" and r.answer is not None]
        quorum = min(self._settings.quorum, len(members))
        if len(answered) < quorum:
            self._stage("quorum_lost")
            await out.error(UpstreamError(
                f"the council lost its quorum: {len(answered)} of {len(members)} members "
                f"answered, {quorum} needed",
                code="council_quorum_lost", retryable=True))
            return
        if streamed:
            await out.send("progress", {"stage": "judging", "judge": decision.judge.id})
        question = question_of(env.body)
        texts = [answer_of(r.answer or {}) for r in answered]
        n = len(reports)
        self._stage("judge")
        judge, verdict = await self._judge(env, decision, decision.judge, question, texts, n + 1)
        reports.append(judge)
        chosen = answered[verdict.best - 1] if verdict is not None else answered[0]
        completion = dict(chosen.answer or {})
        synthesis: Report | None = None
        if (env.routing.council_output or decision.council_output) == "synthesis":
            self._stage("synthesis")
            synthesis = await self._call(env, decision, decision.judge, synthesis_body(
                decision.judge.id, question, texts, verdict), len(reports) + 1)
            reports.append(synthesis)
            if synthesis.status == "ok" and synthesis.answer is not None:
                completion = synthesis.answer
        council = _council(answered, reports[:n], judge, verdict, chosen, synthesis)
        cost = sum((r.cost_usd for r in reports), Decimal(0))
        usage = _total_usage(reports)
        metadata = {"provider": chosen.provider, "model": chosen.model.id,
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                    "cost_usd": str(cost), "cache_hit": False, "mode": "council",
                    "attempts": [r.summary() for r in reports], "council": council}
        completion["usage"] = usage
        if streamed:
            await out.send("meta", {"provider": chosen.provider, "model": chosen.model.id,
                                    "attempt": chosen.n})
            for chunk in _chunks(completion):
                await out.chunk(chunk)
            await out.send("done", {"usage": usage, "metadata": metadata})
        else:
            await out.send("done", {"completion": completion, "usage": usage,
                                    "metadata": metadata})

    async def _members(self, env: RequestEnvelope, decision: Decision,
                       members: tuple[Model, ...], out: FrameWriter | None) -> list[Report]:
        # Members answer whole: the judge needs complete answers, whatever the client asked.
        body = {k: v for k, v in env.body.items() if k not in ("stream", "stream_options")}
        reports: list[Report] = []
        tasks: set[asyncio.Task[Report]] = set()
        for n, model in enumerate(members, 1):
            if not await self._runner.may_call(model):
                continue  # its breaker opened since the decision, and the probe is taken
            try:
                route = await self._resolver.resolve(model, env.tenant_id)
            except SwitchyardError:
                continue  # no key for that provider: one member fewer
            tasks.add(asyncio.create_task(self._runner.run(
                env, decision, model, route, n, Lead(None), mode="council", body=body,
                timeout_s=self._settings.member_timeout_s)))
        try:
            pending = tasks
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=self._settings.progress_every_s if out else None)
                reports.extend(t.result() for t in done)
                if out is not None:
                    ok = sum(r.status == "ok" for r in reports)
                    await out.send("progress", {"stage": "members", "answered": ok,
                                                "failed": len(reports) - ok,
                                                "of": len(members)})
        finally:
            for task in tasks:
                task.cancel()  # only still-running ones: a client gone, or shutdown
        return sorted(reports, key=lambda r: r.n)

    async def _judge(self, env: RequestEnvelope, decision: Decision, judge: Model,
                     question: str, texts: list[str], n: int) -> tuple[Report, Verdict | None]:
        body = judge_body(judge.id, question, texts, json_mode="json" in judge.capabilities)
        report = await self._call(env, decision, judge, body, n)
        if report.status != "ok" or report.answer is None:
            return report, None
        return report, parse_verdict(answer_of(report.answer), len(texts))

    async def _call(self, env: RequestEnvelope, decision: Decision, model: Model,
                    body: dict[str, Any], n: int) -> Report:
        try:
            route = await self._resolver.resolve(model, env.tenant_id)
        except SwitchyardError as exc:
            return Report(n, model, model.provider, status="error", error=exc)
        # The judge's outcome is not evidence about serving this request's category.
        return await self._runner.run(env, decision, model, route, n, Lead(None),
                                      mode="council", body=body, teach=False,
                                      timeout_s=self._settings.judge_timeout_s)


def _council(answered: list[Report], members: list[Report], judge: Report,
             verdict: Verdict | None, chosen: Report,
             synthesis: Report | None) -> dict[str, Any]:
    scores = {} if verdict is None else {
        answered[s.candidate - 1].n: s for s in verdict.scores}
    listed = []
    for report in members:
        entry = report.summary()
        if (score := scores.get(report.n)) is not None:
            entry["score"], entry["reason"] = score.score, score.reason
        listed.append(entry)
    out: dict[str, Any] = {
        "output": "synthesis" if synthesis is not None and synthesis.status == "ok"
        else "winner",
        "winner": {"attempt": chosen.n, "provider": chosen.provider,
                   "model": chosen.model.id},
        "members": listed,
        "judge": {**judge.summary(), "status": "ok" if verdict is not None
                  else "failed" if judge.status != "ok" else "unparseable"},
    }
    if synthesis is not None:
        out["synthesis"] = synthesis.summary()
    return out


def _total_usage(reports: list[Report]) -> dict[str, Any]:
    """Every call the council made: what the request consumed, and is billed for."""
    prompt = sum(r.usage.prompt_tokens for r in reports)
    completion = sum(r.usage.completion_tokens for r in reports)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_tokens
                                                           for r in reports)},
            "completion_tokens_details": {"reasoning_tokens": sum(r.usage.reasoning_tokens
                                                                  for r in reports)}}


def _chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole completion as the stream of chunks a provider would have sent."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    base = {"id": completion.get("id", ""), "object": "chat.completion.chunk",
            "created": completion.get("created", int(time.time())),
            "model": completion.get("model", "")}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    content = message.get("content") or ""
    # Pieces of a few words: clients render progressively and their parsers see real chunks.
    for piece in _pieces(content):
        out.append(chunk({"content": piece}))
    for i, call in enumerate(message.get("tool_calls") or ()):
        out.append(chunk({"tool_calls": [{"index": i, **call}]}))
    out.append(chunk({}, choice.get("finish_reason") or "stop"))
    return out


def _pieces(text: str, size: int = 64) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]
