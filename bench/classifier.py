"""Prompt classifier latency and throughput: the committed ONNX model under onnxruntime (one
intra-op thread, as the classifier worker runs it), on the dev prompts.

    python -m bench.classifier [--rounds 3] [--seconds 3]

Single-prompt latency is the wall time of one `classify([prompt])` call (Python feature
preparation + onnxruntime), over every dev prompt `--rounds` times after a warm-up; batched
throughput runs batches of 1, 8 and 32 consecutive dev prompts for `--seconds` each. Writes its
section of bench/RESULTS.md (between its markers) and prints it."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from workers.classifier.evaluate import evaluate, load_jsonl
from workers.classifier.model import PromptClassifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- bench.classifier:start -->", "<!-- bench.classifier:end -->"
MODEL = ROOT / "workers/classifier/model/prompt-classifier-v1.onnx"
DEV = ROOT / "data/prompt-categories/dev.jsonl"
BATCH_SIZES = (1, 8, 32)
WARMUP_CALLS = 300


def single_latencies_ms(classifier: PromptClassifier, texts: list[str],
                        rounds: int) -> npt.NDArray[np.float64]:
    for text in texts[:WARMUP_CALLS]:
        classifier.classify([text])
    gc.collect()
    out = []
    for _ in range(rounds):
        for text in texts:
            start = time.perf_counter_ns()
            classifier.classify([text])
            out.append(time.perf_counter_ns() - start)
    return np.array(out) / 1e6


def throughput(classifier: PromptClassifier, texts: list[str], batch: int,
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
    ms = np.array(times) / 1e6
    return done / (ms.sum() / 1e3), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def render(args: argparse.Namespace, classifier: PromptClassifier,
           lat: npt.NDArray[np.float64], rows: list[tuple[int, float, float, float]],
           accuracy: float, macro_f1: float, n_prompts: int) -> str:
    p50, p95, p99, worst = np.percentile(lat, [50, 95, 99, 100])
    command = ("python -m bench.classifier " + " ".join(sys.argv[1:])).strip()
    lines = [START, "## Classifier: prompt category model (ONNX)", "",
             f"Command: `{command}` ({args.rounds} rounds over the {n_prompts} dev prompts "
             f"after {WARMUP_CALLS} warm-up calls; batches for {args.seconds:g} s each).", "",
             _machine(), "",
             f"Model: `{classifier.version}` ({MODEL.stat().st_size / 1e6:.1f} MB); "
             f"dev accuracy **{accuracy:.4f}**, macro-F1 **{macro_f1:.4f}** "
             f"(`switchyard classify --eval data/prompt-categories/dev.jsonl`).", "",
             "Single prompt, one `classify([prompt])` call (feature preparation in Python + "
             "onnxruntime, 1 thread):", "",
             "| calls | p50 ms | p95 ms | p99 ms | max ms |",
             "| ---: | ---: | ---: | ---: | ---: |",
             f"| {len(lat)} | {p50:.3f} | {p95:.3f} | {p99:.3f} | {worst:.3f} |", "",
             "Batched (consecutive dev prompts per call, as the stage batches concurrent "
             "messages):", "",
             "| batch size | prompts/s | p50 ms per batch | p99 ms per batch |",
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
    classifier = PromptClassifier(MODEL)
    texts = load_jsonl(DEV)[0]
    report = evaluate(classifier, DEV)
    lat = single_latencies_ms(classifier, texts, args.rounds)
    rows = [(b, *throughput(classifier, texts, b, args.seconds)) for b in BATCH_SIZES]
    section = render(args, classifier, lat, rows, report.accuracy, report.macro_f1, len(texts))
    print(section)
    write_section(section)


if __name__ == "__main__":
    main()
