"""Scoring a classifier on a labelled JSON Lines file (objects with `text` and `label`):
accuracy, macro-F1, per-label precision / recall / F1 and the confusion counts; and a seeded
sample of the rows it got wrong, to read (`switchyard classify --eval F --errors N`)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

BATCH = 64


class _Labelled(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def confidence(self) -> float: ...


class Classifier(Protocol):
    def classify(self, texts: Sequence[str]) -> Sequence[_Labelled]: ...


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  # rows with this gold label


@dataclass(frozen=True, slots=True)
class Report:
    rows: int
    accuracy: float
    macro_f1: float  # mean F1 over the labels present in the gold data
    per_label: tuple[LabelScore, ...]
    # (gold, predicted) -> rows; only pairs that occurred
    confusion: dict[tuple[str, str], int]

    def table(self) -> str:
        """A plain-text report: the headline figures, per-label scores, confusion matrix."""
        labels = [s.label for s in self.per_label]
        width = max(len(label) for label in [*labels, "label"])
        lines = [f"rows {self.rows}  accuracy {self.accuracy:.4f}  "
                 f"macro-F1 {self.macro_f1:.4f}", "",
                 f"{'label':<{width}}  precision  recall      f1  support"]
        lines += [f"{s.label:<{width}}  {s.precision:9.4f}  {s.recall:6.4f}  {s.f1:6.4f}  "
                  f"{s.support:7d}" for s in self.per_label]
        short = [label[:6] for label in labels]
        lines += ["", "confusion (rows: gold, columns: predicted)",
                  " " * width + "".join(f"{s:>8}" for s in short)]
        lines += [f"{gold:<{width}}" + "".join(f"{self.confusion.get((gold, p), 0):8d}"
                                               for p in labels) for gold in labels]
        return "\n".join(lines)


def load_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of a JSON Lines file, in file order."""
    texts: list[str] = []
    labels: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
                raise ValueError(f"{path}:{number}: needs string fields 'text' and 'label'")
            texts.append(row["text"])
            labels.append(row["label"])
    return texts, labels


def score(gold: Sequence[str], predicted: Sequence[str]) -> Report:
    if len(gold) != len(predicted) or not gold:
        raise ValueError("need as many predictions as gold labels, and at least one")
    confusion = Counter(zip(gold, predicted, strict=True))
    gold_counts = Counter(gold)
    predicted_counts = Counter(predicted)
    per_label = []
    for label in sorted(set(gold) | set(predicted)):
        tp = confusion[(label, label)]
        precision = tp / predicted_counts[label] if predicted_counts[label] else 0.0
        recall = tp / gold_counts[label] if gold_counts[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label.append(LabelScore(label, precision, recall, f1, gold_counts[label]))
    correct = sum(n for (g, p), n in confusion.items() if g == p)
    macro = [s.f1 for s in per_label if s.support]
    return Report(rows=len(gold), accuracy=correct / len(gold),
                  macro_f1=sum(macro) / len(macro), per_label=tuple(per_label),
                  confusion=dict(sorted(confusion.items())))


@dataclass(frozen=True, slots=True)
class Miss:
    text: str
    gold: str
    predicted: str
    confidence: float

    def line(self, width: int = 160) -> str:
        text = " | ".join(self.text.split("\n"))
        cut = text if len(text) <= width else text[:width - 1] + "…"
        return f"{self.gold} -> {self.predicted} ({self.confidence:.2f}): {cut}"


@dataclass(frozen=True, slots=True)
class Labelled:
    """A file's rows as the classifier labelled them."""
    texts: list[str]
    gold: list[str]
    predicted: list[_Labelled]

    def report(self) -> Report:
        return score(self.gold, [p.label for p in self.predicted])

    def misses(self, count: int, seed: int = 0) -> list[Miss]:
        """`count` of the wrongly labelled rows, drawn with `seed`, in file order."""
        wrong = [i for i, (g, p) in enumerate(zip(self.gold, self.predicted, strict=True))
                 if g != p.label]
        chosen = sorted(random.Random(seed).sample(wrong, min(count, len(wrong))))
        return [Miss(self.texts[i], self.gold[i], self.predicted[i].label,
                     self.predicted[i].confidence) for i in chosen]


def label_file(classifier: Classifier, path: Path | str) -> Labelled:
    texts, gold = load_jsonl(Path(path))
    predicted: list[_Labelled] = []
    for start in range(0, len(texts), BATCH):
        predicted += classifier.classify(texts[start:start + BATCH])
    return Labelled(texts, gold, predicted)


def evaluate(classifier: Classifier, path: Path | str) -> Report:
    return label_file(classifier, path).report()
