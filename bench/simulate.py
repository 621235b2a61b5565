"""Routing policies on simulated providers, one of which degrades and recovers mid-run; and
the cost of one routing decision against a real Redis.

    python -m bench.simulate [--seeds 0-7] [--requests 12000] [--half-life 8] [--evidence 128]

Thompson sampling is the real core (`topics.bandit`: reward, weights, decay, sampler)
over an in-process mirror of the Redis store's arithmetic (update = decay to now, then add;
read = decay to now; tests/test_bandit.py proves the Lua does the same), read through a
100 ms cache as the router does. Outcomes reach a policy only when the call ends (arrival +
latency), quality scores later still. Writes its section of bench/RESULTS.md, prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import platform
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as redis

from bench.latency import RESULTS
from compose.stack import free_port
from state.bandit import CachedPosteriors, PosteriorStore
from state.redis_client import make_redis
from topics import bandit
from topics.bandit import ObjectiveWeights, Outcome, decay, reward
from topics.settings import RedisSettings
from workers.router.sampler import ThompsonSampler

START, END = "<!-- bench.simulate:start -->", "<!-- bench.simulate:end -->"
CATEGORIES = ("code", "question_answering", "summarization", "math", "creative_writing")
MIX = (0.35, 0.25, 0.20, 0.10, 0.10)  # share of traffic per category


@dataclass(frozen=True, slots=True)
class Arm:
    route: str
    cost_usd: float  # per request of typical size
    median_ms: float  # lognormal latency
    sigma: float
    error_rate: float
    slo_ms: float
    quality: tuple[float, ...]  # true mean quality per category, in CATEGORIES order


ARMS = (
    Arm("gemini-2.5-flash", 0.0011, 800, 0.35, 0.005, 2000, (0.88, 0.90, 0.90, 0.78, 0.72)),
    Arm("claude-haiku-4-5", 0.0030, 700, 0.30, 0.010, 2000, (0.80, 0.76, 0.82, 0.66, 0.86)),
    Arm("gpt-5.4-mini", 0.0024, 1100, 0.35, 0.010, 2000, (0.76, 0.80, 0.74, 0.92, 0.72)),
    Arm("deepseek-chat", 0.0007, 2400, 0.50, 0.030, 2000, (0.74, 0.70, 0.72, 0.84, 0.62)),
    Arm("mistral-small-latest", 0.0005, 900, 0.40, 0.020, 2000, (0.60, 0.66, 0.70, 0.56, 0.64)),
    Arm("claude-sonnet-4-6", 0.0090, 1800, 0.35, 0.010, 4000, (0.90, 0.84, 0.82, 0.86, 0.96)),
)
DEGRADED = 0  # gemini: cheap and good, so leaving it costs something and returning matters
WEIGHTS = ObjectiveWeights(cost=0.5, latency=1.0, quality=2.0)  # a quality-minded tenant
RATE = 10.0  # requests per second (Poisson): the clock that decay and the cache run on
FEEDBACK_P, FEEDBACK_DELAY_S = 0.5, 5.0  # a judge scores half the answers, ~5 s later
WINDOW = 100  # requests, for the "requests until" figures
OK_WEIGHT = bandit.outcome_weight(Outcome(True, 0, 1, 0, 0), WEIGHTS, FEEDBACK_P)
FB_WEIGHT = bandit.feedback_weight(WEIGHTS, FEEDBACK_P)


def degraded(arm: Arm) -> Arm:
    """Latency x5 and 30 % errors."""
    return Arm(arm.route, arm.cost_usd, arm.median_ms * 5, arm.sigma, 0.30, arm.slo_ms,
               arm.quality)


def expected_rewards(is_degraded: bool) -> np.ndarray:
    """True E[reward] per (category, arm). Reward is linear in its terms and only the latency
    score is random: its mean comes from Monte Carlo with the real formula."""
    rng, cheapest, w = np.random.default_rng(99), min(a.cost_usd for a in ARMS), WEIGHTS
    out = np.zeros((len(CATEGORIES), len(ARMS)))
    for j, arm in enumerate(ARMS):
        a = degraded(arm) if is_degraded and j == DEGRADED else arm
        lat = a.median_ms * np.exp(a.sigma * rng.standard_normal(20_000))
        score = w.latency * np.mean([bandit.latency_score(x, a.slo_ms) for x in lat]) + \
            w.cost * bandit.cost_score(a.cost_usd, cheapest)
        for c in range(len(CATEGORIES)):
            out[c, j] = (1 - a.error_rate) * (score + w.quality * a.quality[c]) / (
                w.cost + w.latency + w.quality)
    return out


class Policy:
    name = "?"

    def choose(self, t: float, c: int) -> int:
        raise NotImplementedError

    def outcome(self, t: float, c: int, a: int, r: float, ok: bool, ms: float) -> None:
        """The call ended: its reward without quality (not known yet)."""

    def feedback(self, t: float, c: int, a: int, quality: float) -> None:
        """A quality score arrived for an earlier answer."""


class Thompson(Policy):
    """The router's algorithm; the store's arithmetic mirrored in process."""

    def __init__(self, name: str, seed: int, half_life_s: float, prior: tuple[float, float],
                 evidence: float) -> None:
        self.name, self.hl, self.prior = name, half_life_s, prior
        self.sampler = ThompsonSampler(seed, prior=prior, evidence=evidence)
        # per (category, arm): [alpha, beta, updated_s], as in the hash sy:post:<cat>:<route>
        self.post = [[[*prior, 0.0] for _ in ARMS] for _ in CATEGORIES]
        self.cache: list[tuple[float, list[tuple[float, float]]]] = [(-1.0, [])] * len(MIX)

    def choose(self, t: float, c: int) -> int:
        at, snap = self.cache[c]
        if t - at >= 0.1:  # CachedPosteriors: one read per category and 100 ms
            snap = [decay(al, be, *self.prior, t - u, self.hl) for al, be, u in self.post[c]]
            self.cache[c] = (t, snap)
        return self.sampler.choose(snap)

    def _update(self, t: float, c: int, a: int, weight: float, value: float) -> None:
        al, be, u = self.post[c][a]
        al, be = decay(al, be, *self.prior, t - u, self.hl)
        self.post[c][a] = [al + weight * value, be + weight * (1 - value), t]

    def outcome(self, t: float, c: int, a: int, r: float, ok: bool, ms: float) -> None:
        self._update(t, c, a, OK_WEIGHT if ok else 1.0, r)

    def feedback(self, t: float, c: int, a: int, quality: float) -> None:
        self._update(t, c, a, FB_WEIGHT, quality)


class EpsilonGreedy(Policy):
    """Per category; constant step size (it must track a changing world), optimistic start;
    the same weighted outcome and feedback updates as Thompson. epsilon 0.1 and step 0.2 were
    the best of a 3 x 3 sweep on these seeds."""

    name = "epsilon-greedy"

    def __init__(self, seed: int, eps: float = 0.1, step: float = 0.2) -> None:
        self.rng, self.eps, self.step = np.random.default_rng(seed), eps, step
        self.value = np.ones((len(CATEGORIES), len(ARMS)))

    def choose(self, t: float, c: int) -> int:
        if self.rng.random() < self.eps:
            return int(self.rng.integers(len(ARMS)))
        return int(np.argmax(self.value[c]))

    def outcome(self, t: float, c: int, a: int, r: float, ok: bool, ms: float) -> None:
        self.value[c, a] += self.step * (OK_WEIGHT if ok else 1.0) * (r - self.value[c, a])

    def feedback(self, t: float, c: int, a: int, quality: float) -> None:
        self.value[c, a] += self.step * FB_WEIGHT * (quality - self.value[c, a])


class LowestLatency(Policy):
    """Latency-based routing: lowest EWMA latency per route (all categories), every route
    tried first; a failure counts as 10x its SLO, as such routers penalise timeouts."""

    name = "lowest-EWMA-latency"

    def __init__(self) -> None:
        self.ewma = [0.0] * len(ARMS)

    def choose(self, t: float, c: int) -> int:
        return int(np.argmin(self.ewma))

    def outcome(self, t: float, c: int, a: int, r: float, ok: bool, ms: float) -> None:
        ms = ms if ok else 10 * ARMS[a].slo_ms
        self.ewma[a] = ms if self.ewma[a] == 0 else self.ewma[a] + 0.1 * (ms - self.ewma[a])


class Fixed(Policy):
    """round-robin, random, cost-first and the oracle: no learning."""

    def __init__(self, name: str, seed: int, truth: dict[bool, np.ndarray],
                 phase: list[bool]) -> None:
        self.name, self.rng, self.truth, self.phase, self.i = name, np.random.default_rng(seed), \
            truth, phase, -1

    def choose(self, t: float, c: int) -> int:
        self.i += 1
        if self.name == "round-robin":
            return self.i % len(ARMS)
        if self.name == "random":
            return int(self.rng.integers(len(ARMS)))
        if self.name == "cost-first":
            return min(range(len(ARMS)), key=lambda a: ARMS[a].cost_usd)
        return int(np.argmax(self.truth[self.phase[0]][c]))  # the oracle


@dataclass
class Run:
    regret: float  # sum over requests of E[reward] of the oracle's route minus the chosen one's
    reward: float
    cost: float
    p95_ms: float
    off_after: float  # requests after degradation until DEGRADED's windowed share < 5 %
    back_after: float  # requests after recovery until it is back to half its earlier share


def simulate(policy: Policy, seed: int, n: int, truth: dict[bool, np.ndarray],
             phase: list[bool]) -> Run:
    """One run; DEGRADED is degraded for the middle third. `phase[0]` tells the oracle."""
    rng = np.random.default_rng(10_000 + seed)  # the same seed for every policy
    t, start, stop, cheapest = 0.0, n // 3, 2 * n // 3, min(a.cost_usd for a in ARMS)
    pending: list[tuple[float, int, int, int, int, float, bool, float]] = []
    chosen, latencies = np.zeros(n, dtype=int), np.zeros(n)
    regret = total = cost = 0.0
    for i in range(n):
        t += rng.exponential(1 / RATE)
        phase[0] = start <= i < stop
        while pending and pending[0][0] <= t:
            at, _, kind, c, a, value, ok, ms = heapq.heappop(pending)
            if kind == 0:
                policy.outcome(at, c, a, value, ok, ms)
            else:
                policy.feedback(at, c, a, value)
        c = int(rng.choice(len(MIX), p=MIX))
        a = policy.choose(t, c)
        arm = degraded(ARMS[a]) if phase[0] and a == DEGRADED else ARMS[a]
        ok = bool(rng.random() >= arm.error_rate)
        ms = arm.median_ms * float(np.exp(arm.sigma * rng.standard_normal()))
        ms = ms if ok else ms * 0.3  # errors come back sooner than answers
        size = float(rng.lognormal(0, 0.5))  # tokens: scales every route's price alike
        q = float(rng.beta(10 * arm.quality[c], 10 * (1 - arm.quality[c])))  # a noisy judge
        seen = Outcome(ok, ms, arm.slo_ms, arm.cost_usd * size, cheapest * size, None)
        done = t + ms / 1000
        heapq.heappush(pending, (done, i, 0, c, a, reward(seen, WEIGHTS), ok, ms))
        if ok and rng.random() < FEEDBACK_P:
            heapq.heappush(pending, (done + rng.exponential(FEEDBACK_DELAY_S), i, 1, c, a, q,
                                     ok, ms))
        mu = truth[phase[0]][c]
        regret += float(mu.max() - mu[a])
        total += reward(Outcome(ok, ms, seen.slo_ms, seen.cost_usd, seen.cheapest_cost_usd, q),
                        WEIGHTS)
        cost += arm.cost_usd * size if ok else 0.0  # a failed call is not billed
        chosen[i], latencies[i] = a, ms
    hit = (chosen == DEGRADED).astype(float)
    share = np.convolve(hit, np.ones(WINDOW) / WINDOW)[:n]  # over requests k-WINDOW+1 .. k
    before = float(hit[start - 2000:start].mean())
    off = np.flatnonzero(share[start:stop] < 0.05)
    back = np.flatnonzero(share[stop:] >= before / 2) if before > 0 else np.array([])
    return Run(regret, total, cost, float(np.percentile(latencies, 95)),
               float(off[0] + 1) if off.size else np.inf,
               float(back[0] + 1) if back.size else np.inf)


def run_all(args: argparse.Namespace) -> dict[str, list[Run]]:
    truth = {flag: expected_rewards(flag) for flag in (False, True)}
    results: dict[str, list[Run]] = {}
    prior = (args.prior_alpha, args.prior_beta)
    for seed in args.seeds:
        phase = [False]
        policies: list[Policy] = [
            Thompson("**Thompson (ours)**", seed, args.half_life, prior, args.evidence),
            Thompson("Thompson, no decay", seed, float("inf"), prior, args.evidence),
            Thompson("Thompson, evidence 1 (literal posterior)", seed, args.half_life, prior,
                     1.0),
            EpsilonGreedy(seed), LowestLatency(),
            *(Fixed(name, seed, truth, phase)
              for name in ("cost-first", "round-robin", "random", "oracle"))]
        for policy in policies:
            results.setdefault(policy.name, []).append(
                simulate(policy, seed, args.requests, truth, phase))
    return results


def sensitivity(args: argparse.Namespace) -> list[tuple[str, list[Run]]]:
    """Thompson with one of half-life, evidence, prior changed: why the defaults."""
    truth = {flag: expected_rewards(flag) for flag in (False, True)}
    hl, k, prior = args.half_life, args.evidence, (args.prior_alpha, args.prior_beta)
    variants = [*((f"half-life {h:g} s", h, k, prior) for h in (hl / 2, hl * 2, hl * 4)),
                *((f"evidence ×{e:g}", hl, e, prior) for e in (16.0, k * 4)),
                *((f"prior ({a:g}, {b:g})", hl, k, (a, b)) for a, b in ((1.0, 1.0), (1.0, 3.0))
                  if (a, b) != prior)]
    return [(name, [simulate(Thompson(name, seed, h, p, e), seed, args.requests, truth, [False])
                    for seed in args.seeds]) for name, h, e, p in variants]


def _pm(values: list[float], digits: int = 0) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "never"
    text = f"{np.mean(finite):.{digits}f} ± {np.std(finite):.{digits}f}"
    return text if len(finite) == len(values) else f"{text} ({len(values) - len(finite)} never)"


async def measure_decisions(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(what, p50 µs, p99 µs). A decision is CachedPosteriors.get + ThompsonSampler.choose over
    8 arms, against a redis-server started here on a free port and stopped at the end."""
    server = shutil.which("redis-server")
    if server is None:
        return []
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL)
    client = make_redis(RedisSettings(url=f"redis://127.0.0.1:{port}/0"))
    try:
        for _ in range(100):
            try:
                await client.ping()
                break
            except redis.ConnectionError:  # still starting
                await asyncio.sleep(0.05)
        prior = (args.prior_alpha, args.prior_beta)
        store = PosteriorStore(client, prior=prior, half_life_s=args.half_life)
        cache = CachedPosteriors(store)
        sampler = ThompsonSampler(0, prior=prior, evidence=args.evidence)
        routes = [a.route for a in ARMS] + ["gpt-4o-mini", "qwen-plus"]
        for i in range(400):
            await store.update(f"b{i}", "code", routes[i % 8], (i % 10) / 10,
                               success=i % 7 > 0, latency_ms=800.0)

        async def decide() -> None:
            posteriors = await cache.get("code", routes)
            sampler.choose([posteriors[r] for r in routes])

        async def update() -> None:
            await store.update(f"u{time.perf_counter_ns()}", "code", routes[0], 0.8,
                               success=True, latency_ms=700.0)

        async def timed(what: str, step: Callable[[], Awaitable[object]], n: int,
                        pause_s: float = 0.0) -> tuple[str, float, float]:
            micros = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                await step()
                micros.append((time.perf_counter_ns() - t0) / 1000)
                if pause_s:
                    await asyncio.sleep(pause_s)
            return what, float(np.percentile(micros, 50)), float(np.percentile(micros, 99))

        await timed("warm-up", decide, 2000)
        return [await timed("decision, back to back (cached)", decide, 20_000),
                await timed("decision, 200/s (refresh ahead in the background)", decide, 3000,
                            0.005),
                await timed("uncached read (first decision after 100 ms idle)",
                            lambda: store.read("code", routes), 3000),
                await timed("update (outcome): one Lua call", update, 3000)]
    finally:
        await client.aclose()
        proc.terminate()
        await proc.wait()


def render(results: dict[str, list[Run]], variants: list[tuple[str, list[Run]]],
           args: argparse.Namespace, command: str,
           decisions: list[tuple[str, float, float]]) -> str:
    n, w = args.requests, WEIGHTS
    mix = ", ".join(f"{c} {m:.0%}" for c, m in zip(CATEGORIES, MIX, strict=True))
    lines = [
        START, "## Router: Thompson-sampling bandit against other policies", "",
        f"Command: `{command}`; seeds {', '.join(map(str, args.seeds))}; mean ± standard "
        "deviation over seeds.", "",
        f"World: {len(ARMS)} routes ({', '.join(a.route for a in ARMS)}); categories {mix}; "
        f"{n} requests at {RATE:g}/s (Poisson); lognormal latencies, per-category quality, "
        f"error rates 0.5–3 %; tenant weights cost {w.cost:g}, latency {w.latency:g}, quality "
        f"{w.quality:g}; a judge scores {FEEDBACK_P:.0%} of answers ~{FEEDBACK_DELAY_S:g} s "
        f"after they end. `{ARMS[DEGRADED].route}` (best in the three largest categories) "
        f"degrades for requests {n // 3}–{2 * n // 3} (latency ×5, 30 % errors), then recovers. "
        "Regret: sum over requests of the oracle route's expected reward minus the chosen "
        f"one's. Off: requests after the degradation until its share of the last {WINDOW} "
        "requests is below 5 % (the oracle's figure is the window's own lag). Back: requests "
        "after recovery until that share is half what it was before.", "",
        f"Thompson: half-life {args.half_life:g} s, prior ({args.prior_alpha:g}, "
        f"{args.prior_beta:g}), evidence ×{args.evidence:g} at draw time, 100 ms cache. The "
        "half-life sets how fast, in seconds, evidence fades: how soon a degraded provider is "
        "left and a recovered one retried (rows at the bottom: half as long costs regret, "
        "twice as long leaves later). Evidence ×k sharpens the draw: the literal posterior "
        "(×1) treats each composite reward as a coin flip, stays too wide to tell routes a few "
        "points apart within a half-life, and keeps exploring bad routes. The prior (mean "
        "below the usual rewards) is mildly pessimistic: a route whose evidence has faded is "
        "retried now and then, not flooded.", "",
        "| policy | regret | total reward | total cost $ | p95 latency ms | off after | "
        "back after |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in [*results.items(), *variants]:
        col = {k: [getattr(r, k) for r in runs] for k in Run.__dataclass_fields__}
        lines.append(f"| {name} | {_pm(col['regret'])} | {_pm(col['reward'])} | "
                     f"{_pm(col['cost'], 2)} | {_pm(col['p95_ms'])} | {_pm(col['off_after'])} | "
                     f"{_pm(col['back_after'])} |")
        if name == "oracle":
            lines.append("| *Thompson with one setting changed:* | | | | | | |")
    lines += ["", f"Decision latency, 8 arms, µs (Python {platform.python_version()}, numpy "
              f"{np.__version__}, redis-server on loopback; load average "
              f"{os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores):", ""]
    if decisions:
        lines += ["| what | p50 µs | p99 µs |", "| --- | ---: | ---: |"]
        lines += [f"| {what} | {p50:.0f} | {p99:.0f} |" for what, p50, p99 in decisions]
        lines += ["", "Paced decisions never wait for Redis (the refresh runs in the "
                  "background); they are slower than back-to-back ones because each starts "
                  "on cold CPU caches after 5 ms idle, more so when other processes share "
                  "the cores."]
    else:
        lines.append("not measured: no `redis-server` on PATH.")
    lines.append(END)
    return "\n".join(lines)


def write_section(section: str, path: Path = RESULTS) -> None:
    """Replace this command's section of bench/RESULTS.md (between START and END), or append
    it; other sections are left alone. (bench.latency's helper is tied to its own markers.)"""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__)
    p.add_argument("--seeds", type=_seeds, default=list(range(8)), help="e.g. 0-7 or 1,5")
    p.add_argument("--requests", type=int, default=12_000)
    p.add_argument("--half-life", type=float, default=bandit.HALF_LIFE_S)
    p.add_argument("--prior-alpha", type=float, default=bandit.PRIOR[0])
    p.add_argument("--prior-beta", type=float, default=bandit.PRIOR[1])
    p.add_argument("--evidence", type=float, default=bandit.EVIDENCE)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.requests < 6000:
        p.error("--requests must be at least 6000 (2000 requests measure the share before)")
    results, variants = run_all(args), sensitivity(args)
    decisions = asyncio.run(measure_decisions(args))
    section = render(results, variants, args,
                     " ".join(["python -m bench.simulate", *sys.argv[1:]]), decisions)
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
