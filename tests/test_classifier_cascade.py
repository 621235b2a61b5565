"""The classifier that serves: the linear model, with the fine-tuned encoder asked on the
prompts the linear model is unsure of and the two blended (workers/classifier/cascade.py).
Quality on dev, what takes which path, batching, the encoder's input, the stage's labeller,
the CLI and the metadata. No services needed; latency is measured in bench/classifier.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from compose.cli import main
from topics.messages import RequestEnvelope
from topics.settings import ClassifierSettings
from workers.classifier.cascade import MIN_ENCODER_WORDS, CascadeClassifier, Unsure
from workers.classifier.encoder import MAX_TOKENS, PromptEncoder, encode, load_tokenizer
from workers.classifier.evaluate import evaluate, label_file, load_jsonl
from workers.classifier.metrics import ClassifierMetrics
from workers.classifier.stage import Labeller

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "workers/classifier/model"
ENCODER = MODEL_DIR / "prompt-encoder-v1.onnx"
METADATA = ENCODER.with_suffix(".json")
DEV = ROOT / "data/prompt-categories/dev.jsonl"
TRAIN = ROOT / "data/prompt-categories/train.jsonl"

# The committed cascade scores 0.8679 on dev, macro-F1 0.8554 (the linear model 0.8606 and
# 0.8503); issue 21's target of 0.89 is not reached (docs/routing.md#the-classifier). These
# floors guard against regressions (above the linear model alone); the sealed split is the
# final judge.
DEV_ACCURACY_FLOOR = 0.864
DEV_MACRO_F1_FLOOR = 0.852


@pytest.fixture(scope="module")
def cascade() -> CascadeClassifier:
    return CascadeClassifier.from_settings(ClassifierSettings())


@pytest.fixture(scope="module")
def linear() -> CascadeClassifier:
    return CascadeClassifier.from_settings(ClassifierSettings(encoder_path=None))


@pytest.fixture(scope="module")
def dev() -> list[str]:
    return load_jsonl(DEV)[0]


def test_the_cascade_beats_the_linear_model_on_dev(cascade: CascadeClassifier,
                                               linear: CascadeClassifier) -> None:
    report = evaluate(cascade, DEV)
    print(report.table())  # shown with -s: per-label scores and confusion counts
    assert report.rows == 1234
    assert report.accuracy >= DEV_ACCURACY_FLOOR
    assert report.macro_f1 >= DEV_MACRO_F1_FLOOR
    assert report.accuracy > evaluate(linear, DEV).accuracy + 0.005


def test_only_the_prompts_the_linear_model_is_unsure_of_reach_the_encoder(
        cascade: CascadeClassifier, linear: CascadeClassifier, dev: list[str]) -> None:
    first = cascade.first(dev)
    unsure = [p for p in first if isinstance(p, Unsure)]
    assert 0.05 < len(unsure) / len(dev) < 0.5  # the cascade's p50 is the linear path's
    for text, p, alone in zip(dev, first, linear.classify(dev), strict=True):
        words = len(text.split())
        if isinstance(p, Unsure):
            assert alone.confidence < cascade.threshold
            assert words >= MIN_ENCODER_WORDS
            assert float(p.linear.max()) == pytest.approx(alone.confidence)
        else:  # the linear model's own answer, untouched: it is sure, or the prompt is short
            assert (p.label, p.confidence, p.version) == (alone.label, alone.confidence,
                                                          alone.version)
            assert p.confidence >= cascade.threshold or words < MIN_ENCODER_WORDS
    blended = cascade.second(unsure)
    assert all(p.version == cascade.version and "/" in p.version for p in blended)
    assert all(0.0 < p.confidence <= 1.0 for p in blended)
    # The second opinion changes some labels (that is its point), not most of them.
    changed = sum(b.label != cascade.labels[int(u.linear.argmax())]
                  for b, u in zip(blended, unsure, strict=True))
    assert 0 < changed < len(unsure) / 2


def test_a_short_prompt_is_the_linear_models_however_unsure(
        cascade: CascadeClassifier, linear: CascadeClassifier) -> None:
    short, longer = "Hello, how are you?", "Hello there, how are you doing today my friend?"
    [alone] = linear.classify([short])
    assert alone.confidence < cascade.threshold  # unsure, yet not worth the encoder
    assert cascade.first([short]) == [alone]
    assert isinstance(cascade.first([longer])[0], Unsure)


def test_a_batch_labels_like_one_by_one(cascade: CascadeClassifier, dev: list[str]) -> None:
    """A prompt's label must not depend on what it was batched with (the routing preview
    and the request it explains go through different batches). Mixed lengths, some sent to
    the encoder, whose int8 activations are quantized per call: it runs prompt by prompt."""
    texts = [*dev[:64], "", "   ", "x" * 20_000]
    asked = [t for t, p in zip(texts, cascade.first(texts), strict=True)
             if isinstance(p, Unsure)]
    assert len(asked) >= 3
    batch = cascade.classify(texts)
    single = [cascade.classify([t])[0] for t in texts]
    reversed_batch = cascade.classify(texts[::-1])[::-1]
    for b, s, r in zip(batch, single, reversed_batch, strict=True):
        assert b.label == s.label == r.label
        assert b.version == s.version == r.version
        assert b.confidence == pytest.approx(s.confidence, abs=1e-6)
        assert r.confidence == pytest.approx(s.confidence, abs=1e-6)
    assert cascade.classify([]) == []


def test_without_an_encoder_the_linear_model_answers_alone(linear: CascadeClassifier,
                                                           dev: list[str]) -> None:
    assert not any(isinstance(p, Unsure) for p in linear.first(dev[:200]))
    assert "/" not in linear.version
    assert linear.version.startswith("prompt-classifier-v1+")


def test_the_encoder_reads_the_instruction_before_a_long_passage() -> None:
    tokenizer = load_tokenizer(MODEL_DIR / "prompt-encoder-v1.tokenizer.json")
    long = "Summarize the text below.\n\n" + "The river floods every spring. " * 400
    short = "What is the capital of France?"
    feed = encode(tokenizer, [long, short])
    assert feed["input_ids"].shape == (2, MAX_TOKENS)  # cut, and padded to the longest
    ids = feed["input_ids"][0].tolist()
    sep = tokenizer.token_to_id("[SEP]")
    assert tokenizer.decode(ids[:ids.index(sep)]) == "summarize the text below."
    assert feed["token_type_ids"][0, 1] == 0
    assert feed["token_type_ids"][0, -2] == 1
    assert feed["attention_mask"][1].sum() < 16
    assert feed["input_ids"][1, -1] == 0
    assert feed["token_type_ids"][1].max() == 0  # no passage: one sequence, not a pair


async def test_the_labeller_asks_the_encoder_only_when_unsure(cascade: CascadeClassifier,
                                                              dev: list[str]) -> None:
    registry = CollectorRegistry()
    labeller = Labeller(cascade, max_batch=16, metrics=ClassifierMetrics(registry))
    unsure = next(p.text for p in cascade.first(dev) if isinstance(p, Unsure))
    sure = "Write a Python function to check whether a number is prime."

    def envelope(text: str) -> RequestEnvelope:
        return RequestEnvelope.model_validate({
            "request_id": "r", "tenant_id": "t", "key_id": "k", "received_at_ms": 0,
            "deadline_ms": 1, "reply": {"channel": "c"},
            "body": {"model": "auto", "messages": [{"role": "user", "content": text}]}})

    labelled = [await labeller.label(envelope(t)) for t in (sure, unsure, sure)]
    assert labelled[0].category == "code"
    assert labelled[0].classifier_version is not None
    assert "/" not in labelled[0].classifier_version
    assert labelled[1].classifier_version == cascade.version
    assert labelled[1].category == cascade.classify([unsure])[0].label

    def sample(name: str, **labels: str) -> Any:
        return registry.get_sample_value(name, labels)
    assert sample("switchyard_classifier_prompts_total", path="linear") == 2
    assert sample("switchyard_classifier_prompts_total", path="encoder") == 1
    assert sample("switchyard_classifier_encoder_duration_seconds_count") == 1


def test_cli_evaluates_the_cascade_and_the_linear_model_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cascade: CascadeClassifier
) -> None:
    rows = [{"text": "Write a haiku about snow.", "label": "creative_writing"},
            {"text": "What is 17 times 23?", "label": "code"}]  # wrong on purpose
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["classify", "--eval", str(path), "--errors", "5"])
    out = capsys.readouterr().out
    assert out.startswith(f"{cascade.version} on ")
    assert "rows 2  accuracy 0.5000" in out
    # Only the one row it got wrong, however many are asked for.
    _, misses = out.split("5 of the rows it got wrong (seed 0):\n")
    [miss] = misses.splitlines()
    gold, predicted = miss.split(" (")[0].split(" -> ")
    assert (gold, predicted != "code") == ("code", True)
    assert miss.endswith("): What is 17 times 23?")
    main(["classify", "--linear-only", "Write a haiku about snow."])
    label, confidence = capsys.readouterr().out.split()
    assert label == "creative_writing"
    assert 0.0 < float(confidence) <= 1.0


def test_the_sample_of_misses_is_drawn_by_its_seed(cascade: CascadeClassifier) -> None:
    labelled = label_file(cascade, DEV)
    misses = labelled.misses(40, seed=1)
    assert misses == labelled.misses(40, seed=1)
    assert misses != labelled.misses(40, seed=2)
    assert len(misses) == 40
    assert all(m.gold != m.predicted for m in misses)
    rows = [labelled.texts.index(m.text) for m in misses]
    assert rows == sorted(rows)  # in file order
    assert all(labelled.gold[row] == m.gold for row, m in zip(rows, misses, strict=True))


def test_metadata_matches_the_encoder(cascade: CascadeClassifier) -> None:
    meta = json.loads(METADATA.read_text())
    digest = hashlib.sha256(ENCODER.read_bytes()).hexdigest()
    encoder = PromptEncoder(ENCODER)
    assert meta["model_sha256"] == digest
    assert meta["version"] == encoder.version == f"prompt-encoder-v1+{digest[:12]}"
    assert meta["labels"] == list(encoder.labels) == list(cascade.labels)
    assert meta["train"]["sha256"] == hashlib.sha256(TRAIN.read_bytes()).hexdigest()
    tokenizer = MODEL_DIR / "prompt-encoder-v1.tokenizer.json"
    assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert (meta["cascade"]["threshold"], meta["cascade"]["encoder_weight"]) == (
        cascade.threshold, encoder.weight)
    assert meta["dev"]["cascade_int8"] == round(evaluate(cascade, DEV).accuracy, 4)
    texts, gold = load_jsonl(DEV)
    probs = encoder.probabilities(texts)
    alone = float(np.mean([encoder.labels[k] == g
                           for k, g in zip(probs.argmax(axis=1), gold, strict=True)]))
    assert meta["dev"]["encoder_int8"] == round(alone, 4)
