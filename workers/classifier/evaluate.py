"""Scoring a classifier on a labelled JSON Lines file (objects with `text` and `label`):
accuracy, macro-F1, per-label precision / recall / F1 and the confusion counts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

BATCH = 64


class _Labelled(Protocol):
    @property
    def label(self) -> str: ...


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


def evaluate(classifier: Classifier, path: Path | str) -> Report:
    texts, gold = load_jsonl(Path(path))
    predicted: list[str] = []
    for start in range(0, len(texts), BATCH):
        predicted += [p.label for p in classifier.classify(texts[start:start + BATCH])]
    return score(gold, predicted)
