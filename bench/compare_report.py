"""The figures bench.compare collects, and their rendering as a bench/RESULTS.md section."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from bench.loadgen import Result

# CPU columns: a process name maps to the first of these it starts with ("router-0" → router).
CPU_COLUMNS = ("ingress", "classifier", "router", "usage", "kafka", "redis", "postgres",
               "litellm")
GATEWAY_PROCS = {"switchyard": CPU_COLUMNS[:7], "litellm": ("litellm",), "direct": ()}
MEMORY_PROCS = ("ingress", "classifier", "router", "usage", "kafka", "redis", "postgres",
                "litellm", "fake-upstream")


@dataclass
class Phase:
    test: str  # "non-streaming", "streaming", "closed loop"
    load: str  # "200 req/s", "64 connections"
    target: str  # direct | switchyard | litellm
    result: Result
    cpu: dict[str, float]  # CPU seconds during the phase, by process (and "loadgen")
    other_cores: float = 0.0  # mean CPU use of everything else on the box meanwhile


@dataclass
class Memory:
    when: str
    rss_mb: dict[str, float]


@dataclass
class Report:
    command: str
    machine: str
    versions: str
    args: argparse.Namespace
    phases: list[Phase] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    long_phases: list[Result] = field(default_factory=list)
    classify_inline: bool = True  # the routers label prompts (no classifier process)


def render(report: Report) -> str:
    a = report.args
    lines = [
        "## Switchyard against LiteLLM proxy (same box, same fake upstream)", "",
        f"Command: `{report.command.strip()}`. {a.phase_s:g} s per measured phase (after a "
        "1 s warm-up), direct → Switchyard → LiteLLM alternated at every load point in one run; "
        "open loop: latency from each request's *scheduled* send time; closed loop: from its "
        f"send time. Client timeout {a.timeout_s:g} s (a timed-out request is an error). "
        "*Added*: the gateway's percentile minus the direct one's at the same load. *Other "
        "load*: mean CPU (cores) used meanwhile by processes outside this benchmark "
        "(/proc/stat minus every process measured here): the box is shared.", "",
        report.machine, "",
        report.versions, "",
        f"Setup: Switchyard = ingress ({a.ingress_procs} process), {_classifying(report)}, "
        "usage worker (1), Kafka, Redis, PostgreSQL; an API key looked up in "
        "PostgreSQL and cached. LiteLLM = `litellm --config … --num_workers "
        f"{a.peer_workers}`, one model (`openai/gpt-4o-mini`, `api_base` the fake), master "
        "key, no database, `LITELLM_LOG=ERROR`, `set_verbose: false`, "
        "`turn_off_message_logging: true`, spend/error logs off. Both call the same fake "
        "upstream (`compose/fake_upstream.py`, one process), which is also the `direct` "
        "baseline.",
    ]
    for test in ("non-streaming", "streaming", "closed loop"):
        phases = [p for p in report.phases if p.test == test]
        if phases:
            lines += ["", *_latency_table(test, phases, a)]
    if report.phases:
        lines += ["", *_cpu_table(report.phases)]
    if report.memory:
        lines += ["", *_memory_table(report)]
    return "\n".join(lines)


def _classifying(report: Report) -> str:
    # The ONNX classifier runs on every request either way (`model: "gpt-4o-mini"` named,
    # mode auto): the bench pays for the full pipeline.
    every = ("the ONNX prompt classifier runs on every request: `model: \"gpt-4o-mini\"` "
             "named, mode auto")
    if report.classify_inline:
        return f"router ({report.args.routers}; it labels the prompts it reads: {every})"
    return f"classifier (1: {every}), router ({report.args.routers})"


def _latency_table(test: str, phases: list[Phase], a: argparse.Namespace) -> list[str]:
    stream = test == "streaming"
    title = {
        "non-streaming": "### Non-streaming, open loop (16-token answers)",
        "streaming": f"### Streaming, open loop (100-token answers, the fake sends one token "
                     f"every {a.inter_token_ms:g} ms: ≥ {100 * a.inter_token_ms:g} ms per "
                     "answer by construction)",
        "closed loop": f"### Closed loop, {a.concurrency} connections (maximum throughput, "
                       "non-streaming)",
    }[test]
    head = ("| load | target | achieved req/s | errors | "
            + ("TTFT p50 | TTFT p99 | total p50 | total p99 | total p99.9 |" if stream else
               "p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |")
            + " added p50 | added p99 |" + (" added TTFT p50 | added TTFT p99 |" if stream
                                            else "") + " other load (cores) |")
    cols = head.count("|") - 1
    lines = [title, "", head, "| --- | --- |" + " ---: |" * (cols - 2)]
    direct = {p.load: p.result for p in phases if p.target == "direct"}
    for p in phases:
        r, d = p.result, direct.get(p.load)
        if stream:
            figures = [r.pct(50, True), r.pct(99, True), r.pct(50), r.pct(99), r.pct(99.9)]
        else:
            figures = [r.pct(50), r.pct(90), r.pct(99), r.pct(99.9),
                       max(r.latencies_ms, default=math.nan)]
        added = ["–", "–"] + (["–", "–"] if stream else [])
        if d is not None and p.target != "direct":
            added = [f"{r.pct(50) - d.pct(50):+.2f}", f"{r.pct(99) - d.pct(99):+.2f}"]
            if stream:
                added += [f"{r.pct(50, True) - d.pct(50, True):+.2f}",
                          f"{r.pct(99, True) - d.pct(99, True):+.2f}"]
        name = f"**{p.target}**" if p.target != "direct" else p.target
        lines.append(f"| {p.load} | {name} | {r.achieved_rps:.1f} | {r.errors} | "
                     + " | ".join(_ms(x) for x in figures) + " | " + " | ".join(added)
                     + f" | {p.other_cores:.2f} |")
    errors = [f"{p.load} {p.target}: {p.result.error_samples[0]}" for p in phases
              if p.result.error_samples]
    if errors:
        lines += ["", "First error of each phase that had any: "
                  + "; ".join(f"`{e[:160]}`" for e in errors) + "."]
    return lines


def _ms(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}"


def _cpu_table(phases: list[Phase]) -> list[str]:
    lines = ["### CPU-seconds per 1,000 answered requests, by process",
             "",
             "From /proc (user + system, each process with its descendants: PostgreSQL "
             "backends, uvicorn workers) over the measured phase and the settling after it (until "
             "every process is idle again, so a backlog is billed to the phase that made it), "
             "divided by the requests answered with a 200 (work spent on requests that failed "
             "counts against the ones that did not). *Gateway total* sums the gateway's own "
             "processes and services; the fake upstream and the load generator are shown apart "
             "(they serve every target).", "",
             "| test | load | target | answered | " + " | ".join(CPU_COLUMNS)
             + " | **gateway total** | fake upstream | load generator |",
             "| --- | --- | --- |" + " ---: |" * (len(CPU_COLUMNS) + 4)]
    for p in phases:
        sent = max(len(p.result.latencies_ms), 1)
        per_k = {col: 0.0 for col in CPU_COLUMNS}
        for name, seconds in p.cpu.items():
            col = next((c for c in CPU_COLUMNS if name.startswith(c)), None)
            if col is not None:
                per_k[col] += 1000 * seconds / sent
        own = GATEWAY_PROCS[p.target]
        ran = {c for c in CPU_COLUMNS if any(name.startswith(c) for name in p.cpu)}
        # "·": not this target's; "–": not running in this setup (a router that classifies).
        cells = [(f"{per_k[c]:.2f}" if c in ran else "–") if c in own else "·"
                 for c in CPU_COLUMNS]
        total = sum(per_k[c] for c in own)
        lines.append(f"| {p.test} | {p.load} | {p.target} | {len(p.result.latencies_ms):,} | "
                     + " | ".join(cells)
                     + f" | **{total:.2f}** | {1000 * p.cpu.get('fake-upstream', 0) / sent:.2f}"
                     f" | {1000 * p.cpu.get('loadgen', 0) / sent:.2f} |")
    return lines


def _memory_table(report: Report) -> list[str]:
    a = report.args
    lines = ["### Resident memory (MB)", "",
             f"RSS from /proc, after a warm-up (a tenth of the phase's requests) and after a "
             f"long phase per gateway: a closed loop of "
             f"{a.memory_concurrency} connections (as fast as the gateway sustains, so never "
             f"overloaded), {a.memory_requests:,} requests through Switchyard, then "
             f"{a.peer_memory_requests:,} through LiteLLM (what it serves in a few minutes "
             "here), run first, on fresh processes; the last row is after every other phase, "
             "overloaded ones included (Python keeps the high-water mark of its heap). Python "
             "processes with their children; PostgreSQL: the postmaster alone (its backends "
             "share its memory).", "",
             "| when | " + " | ".join(MEMORY_PROCS) + " |",
             "| --- |" + " ---: |" * len(MEMORY_PROCS)]
    for m in report.memory:
        cells = [_mb(m.rss_mb, name) for name in MEMORY_PROCS]
        lines.append(f"| {m.when} | " + " | ".join(cells) + " |")
    if report.long_phases:
        lines += ["", "The long phases themselves:", "",
                  "| target | requests | achieved req/s | errors | p50 ms | p99 ms | p99.9 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report.long_phases:
            lines.append(f"| {r.label} | {r.sent:,} | {r.achieved_rps:.1f} | {r.errors} | "
                         f"{_ms(r.pct(50))} | {_ms(r.pct(99))} | {_ms(r.pct(99.9))} |")
    return lines


def _mb(rss: dict[str, float], prefix: str) -> str:
    values = [v for name, v in rss.items() if name.startswith(prefix)]
    return f"{sum(values):.0f}" if values else "–"
