"""The committed prompt classifier (ONNX, run with onnxruntime): quality on dev, batching,
obvious prompts, the `switchyard classify` CLI, and the metadata written beside the model.
No services needed; latency is measured in bench/classifier.py, not here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from compose.cli import main
from workers.classifier.evaluate import evaluate, load_jsonl
from workers.classifier.model import PromptClassifier

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "workers/classifier/model/prompt-classifier-v1.onnx"
METADATA = MODEL.with_suffix(".json")
DEV = ROOT / "data/prompt-categories/dev.jsonl"
TRAIN = ROOT / "data/prompt-categories/train.jsonl"

# The target was 0.88; the committed model scores 0.861 on dev (0.845 cross-validated on
# train). The dolly-derived labels overlap (closed_qa / information_extraction /
# summarization, brainstorming / open_qa; see data/prompt-categories/README.md), which caps
# what we could reach with models trained here. These floors guard against regressions.
DEV_ACCURACY_FLOOR = 0.85
DEV_MACRO_F1_FLOOR = 0.83

OBVIOUS = {
    "code": ["Write a Python function to check whether a number is prime.",
             'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n'
             '    >>> add(2, 3)\n    5\n    """\n'],
    "math": ["Tom has 3 apples and buys 5 more. He gives 2 to his sister. How many apples "
             "does he have now?",
             "Sara earns $12 an hour and works 8 hours a day for 5 days. How much does she "
             "earn?"],
    "creative_writing": ["Write a short poem about the ocean at night.",
                         "Write a story about a dragon who is afraid of fire."],
    "summarization": ["Give me a short summary of this passage.\n\nPhotosynthesis is a process "
                      "used by plants and other organisms to convert light energy into "
                      "chemical energy that, through cellular respiration, can later be "
                      "released to fuel the organism's activities."],
    "information_extraction": ["Extract the names of all the cities mentioned in this text."
                               "\n\nShe was born in Paris, studied in Berlin and Vienna, and "
                               "later moved to New York where she worked until 1950."],
    "classification": ["Classify each of the following as a fruit or a vegetable: apple, "
                       "carrot, banana, broccoli.",
                       "Tell me whether each of these is a country or a city: France, Tokyo, "
                       "Brazil, Chicago."],
    "question_answering": ["What is the capital of Australia?",
                           "Who wrote the novel Pride and Prejudice?"],
    "brainstorming": ["Give me some ideas for a birthday party for a ten year old.",
                      "Suggest some ways to reduce stress at work."],
}


@pytest.fixture(scope="module")
def classifier() -> PromptClassifier:
    return PromptClassifier(MODEL)


def test_dev_accuracy_and_macro_f1(classifier: PromptClassifier) -> None:
    report = evaluate(classifier, DEV)
    print(report.table())  # shown with -s: per-label scores and confusion counts
    assert report.rows == 1234
    assert report.accuracy >= DEV_ACCURACY_FLOOR
    assert report.macro_f1 >= DEV_MACRO_F1_FLOOR
    assert {s.label for s in report.per_label} == set(classifier.labels)
    assert sum(report.confusion.values()) == report.rows


def test_a_batch_labels_like_one_by_one(classifier: PromptClassifier) -> None:
    # Mixed lengths, with and without passages: padding in a batch must not leak across rows.
    texts = [*load_jsonl(DEV)[0][:48], "", "   ", "x" * 20_000]
    batch = classifier.classify(texts)
    single = [classifier.classify([t])[0] for t in texts]
    assert [p.label for p in batch] == [p.label for p in single]
    for b, s in zip(batch, single, strict=True):
        assert b.confidence == pytest.approx(s.confidence, abs=1e-5)
        assert 0.0 < b.confidence <= 1.0
        assert b.version == classifier.version
    assert classifier.classify([]) == []


@pytest.mark.parametrize(("label", "prompt"),
                         [(label, p) for label, ps in OBVIOUS.items() for p in ps])
def test_obvious_prompts(classifier: PromptClassifier, label: str, prompt: str) -> None:
    assert classifier.classify([prompt])[0].label == label


def test_cli_eval_prints_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"text": OBVIOUS[label][0], "label": label} for label in ("code", "math")]
    rows.append({"text": "Write a limerick about a cat.", "label": "math"})  # wrong on purpose
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["classify", "--model", str(MODEL), "--eval", str(path)])
    out = capsys.readouterr().out
    assert "rows 3  accuracy 0.6667  macro-F1" in out
    assert "creative_writing" in out  # the per-label table includes the predicted label


def test_cli_labels_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    main(["classify", "--model", str(MODEL), "Write a haiku about snow."])
    label, confidence = capsys.readouterr().out.split()
    assert label == "creative_writing"
    assert 0.0 < float(confidence) <= 1.0


def test_metadata_matches_the_model(classifier: PromptClassifier) -> None:
    meta = json.loads(METADATA.read_text())
    digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert meta["model_sha256"] == digest
    assert meta["version"] == classifier.version == f"prompt-classifier-v1+{digest[:12]}"
    assert meta["labels"] == list(classifier.labels) == sorted(OBVIOUS)
    assert meta["train"]["sha256"] == hashlib.sha256(TRAIN.read_bytes()).hexdigest()
    assert meta["dev"]["accuracy"] == round(evaluate(classifier, DEV).accuracy, 4)
    assert 0.0 < meta["dev"]["macro_f1"] <= 1.0
    assert 0.0 < meta["cv"]["accuracy"] <= 1.0
