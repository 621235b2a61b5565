"""Prompt classifier accuracy, latency and throughput: the committed ONNX models under
onnxruntime (one intra-op thread, as the workers run them), on the dev prompts. Three paths:
the linear model alone, the fine-tuned encoder alone, and the cascade that serves (the linear
model, and the encoder blended in on the prompts the linear model is unsure of).

    python -m bench.classifier [--rounds 3] [--seconds 3]

Single-prompt latency is the wall time of one call on one prompt (tokenization or feature
preparation included), over every dev prompt `--rounds` times after a warm-up (the encoder
alone: one round); batched throughput runs the cascade on batches of 1, 8 and 32 consecutive
dev prompts for `--seconds` each. Writes its section of bench/RESULTS.md (between its markers)
and prints it."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from topics.settings import ClassifierSettings
from workers.classifier.cascade import CascadeClassifier, Unsure
from workers.classifier.encoder import PromptEncoder
from workers.classifier.evaluate import Report, evaluate, load_jsonl, score

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- bench.classifier:start -->", "<!-- bench.classifier:end -->"
DEV = ROOT / "data/prompt-categories/dev.jsonl"
BATCH_SIZES = (1, 8, 32)
WARMUP_CALLS = 300


def single_latencies_ms(call: Callable[[list[str]], object], texts: list[str],
                        rounds: int) -> npt.NDArray[np.float64]:
    for text in texts[:WARMUP_CALLS]:
        call([text])
    gc.collect()
    out = []
    for _ in range(rounds):
        for text in texts:
            start = time.perf_counter_ns()
            call([text])
            out.append(time.perf_counter_ns() - start)
    return np.array(out) / 1e6


def throughput(classifier: CascadeClassifier, texts: list[str], batch: int,
               seconds: float) -> tuple[float, float, float]:
    """(prompts per second, p50 ms per batch, p99 ms per batch)."""
    batches = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    for chunk in batches[:20]:
        classifier.classify(chunk)
    gc.collect()
    times: list[int] = []
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for chunk in batches:
            start = time.perf_counter_ns()
            classifier.classify(chunk)
            times.append(time.perf_counter_ns() - start)
            done += len(chunk)
            if time.perf_counter() >= deadline:
                break
    ms = np.array(times) / 1e6
    return done / (ms.sum() / 1e3), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def encoder_report(encoder: PromptEncoder, texts: list[str], gold: list[str]) -> Report:
    probs = encoder.probabilities(texts)
    return score(gold, [encoder.labels[k] for k in probs.argmax(axis=1)])


def _latency_row(name: str, lat: npt.NDArray[np.float64]) -> str:
    p50, p95, p99, worst = np.percentile(lat, [50, 95, 99, 100])
    return f"| {name} | {len(lat)} | {p50:.3f} | {p95:.3f} | {p99:.3f} | {worst:.3f} |"


def render(args: argparse.Namespace, cascade: CascadeClassifier, linear: CascadeClassifier,
           encoder: PromptEncoder, cfg: ClassifierSettings,
           reports: dict[str, Report], share: float,
           latencies: dict[str, npt.NDArray[np.float64]],
           rows: list[tuple[int, float, float, float]], n_prompts: int) -> str:
    command = ("python -m bench.classifier " + " ".join(sys.argv[1:])).strip()
    assert cfg.encoder_path is not None
    sizes = (f"linear {cfg.model_path.stat().st_size / 1e6:.1f} MB, encoder "
             f"{cfg.encoder_path.stat().st_size / 1e6:.1f} MB")
    lines = [START, "## Classifier: prompt category models (ONNX), linear, encoder, cascade",
             "",
             f"Command: `{command}` ({args.rounds} rounds over the {n_prompts} dev prompts "
             f"after {WARMUP_CALLS} warm-up calls, the encoder alone one round; cascade "
             f"batches for {args.seconds:g} s each).", "",
             _machine(), "",
             f"Models: `{linear.version}` and `{encoder.version}` ({sizes}). The cascade asks "
             f"the encoder when the linear model's top probability is under "
             f"{cascade.threshold} and blends their log-probabilities with weight "
             f"{encoder.weight} on the encoder: **{share:.1%}** of dev prompts take the "
             f"encoder path.", "",
             "| model | dev accuracy | macro-F1 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r.accuracy:.4f} | {r.macro_f1:.4f} |"
              for name, r in reports.items()]
    lines += ["", "The cascade's row is `switchyard classify --eval "
              "data/prompt-categories/dev.jsonl` (`--linear-only` for the linear model's).", "",
              "Single prompt, one call on one prompt (tokenization or feature preparation in "
              "Python + onnxruntime, 1 thread):", "",
              "| path | calls | p50 ms | p95 ms | p99 ms | max ms |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [_latency_row(name, lat) for name, lat in latencies.items()]
    lines += ["", "The cascade, batched (consecutive dev prompts per call, as the stage "
              "batches concurrent messages; the encoder runs on each batch's unsure share):",
              "", "| batch size | prompts/s | p50 ms per batch | p99 ms per batch |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {b} | {rate:,.0f} | {b50:.3f} | {b99:.3f} |" for b, rate, b50, b99 in rows]
    lines.append(END)
    return "\n".join(lines)


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores, Python "
            f"{platform.python_version()}, onnxruntime {ort.__version__}, numpy "
            f"{np.__version__}; run {time.strftime('%Y-%m-%d')}.")


def write_section(section: str, path: Path = RESULTS) -> None:
    """Replace this command's section of bench/RESULTS.md, or append it; other sections are
    left alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the dev prompts")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    args = parser.parse_args(argv)
    cfg = ClassifierSettings()
    assert cfg.encoder_path is not None
    cascade = CascadeClassifier.from_settings(cfg)
    linear = CascadeClassifier.from_settings(cfg.model_copy(update={"encoder_path": None}))
    encoder = PromptEncoder(cfg.encoder_path)
    texts, gold = load_jsonl(DEV)
    reports = {"linear alone": evaluate(linear, DEV),
               "encoder alone (int8)": encoder_report(encoder, texts, gold),
               "**cascade**": evaluate(cascade, DEV)}
    unsure = [p for p in cascade.first(texts) if isinstance(p, Unsure)]
    latencies = {
        "linear": single_latencies_ms(linear.classify, texts, args.rounds),
        "linear, on the prompts it is unsure of": single_latencies_ms(
            linear.classify, [u.text for u in unsure], args.rounds),
        "encoder alone, every prompt": single_latencies_ms(encoder.probabilities, texts, 1),
        "**cascade**": single_latencies_ms(cascade.classify, texts, args.rounds),
        "cascade, on the prompts sent to the encoder": single_latencies_ms(
            cascade.classify, [u.text for u in unsure], args.rounds),
    }
    rows = [(b, *throughput(cascade, texts, b, args.seconds)) for b in BATCH_SIZES]
    section = render(args, cascade, linear, encoder, cfg, reports, len(unsure) / len(texts),
                     latencies, rows, len(texts))
    print(section)
    write_section(section)


if __name__ == "__main__":
    main()
