"""The prompt classifier as a cascade: the linear model (`model.py`, ~0.2 ms a prompt) labels
every prompt; the ones it is unsure of (its top probability under the encoder's threshold,
chosen on dev by `finetune.py`) get a second opinion from the fine-tuned encoder
(`encoder.py`, a few milliseconds), and their label is the argmax of the two models' blended
log-probabilities. The blend beats either model alone: the linear model's probabilities
carry what the n-grams know, the encoder's what the words mean.

Split in two steps so the stage can run them differently (`stage.Labeller`): `first` on the
event loop, batched per loop turn; `second` in a worker thread, on whatever queued while
the previous call ran (the encoder itself takes them one by one: a label must not depend on
its batch). `classify` runs both, for the CLI and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from topics.settings import ClassifierSettings
from workers.classifier.encoder import PromptEncoder
from workers.classifier.model import Prediction, PromptClassifier

# A prompt of fewer words is labelled by the linear model alone, however unsure: greetings and
# chit-chat carry nothing the words do not, and on dev the encoder got such prompts no more
# often right (3 of them: the linear model 2, the blend 1). They are common in real traffic,
# and the encoder's cost (1–3 ms of CPU a prompt) would buy nothing there.
MIN_ENCODER_WORDS = 6


def asks_encoder(text: str, top_probability: float, threshold: float) -> bool:
    """Whether the cascade asks the encoder about this prompt (`finetune.py` chooses the
    threshold with the same rule)."""
    return top_probability < threshold and len(text.split(None, MIN_ENCODER_WORDS)) >= \
        MIN_ENCODER_WORDS


@dataclass(frozen=True, slots=True)
class Unsure:
    """A prompt the linear model is unsure of, with its probabilities: the second step's
    input."""

    text: str
    linear: npt.NDArray[np.float32]


class CascadeClassifier:
    """`encoder=None` is the linear model alone (`classifier.encoder_path` unset)."""

    def __init__(self, linear: PromptClassifier, encoder: PromptEncoder | None, *,
                 threshold: float | None = None) -> None:
        if encoder is not None and encoder.labels != linear.labels:
            raise ValueError(f"the encoder's labels {encoder.labels} are not the linear "
                             f"model's {linear.labels}")
        self._linear = linear
        self._encoder = encoder
        # No encoder: nothing is unsure (a probability is never above 1).
        self._threshold = (0.0 if encoder is None
                           else encoder.threshold if threshold is None else threshold)
        self._weight = encoder.weight if encoder is not None else 0.0
        self._blended_version = (f"{linear.version}/{encoder.version}"
                                 if encoder is not None else linear.version)

    @classmethod
    def from_settings(cls, cfg: ClassifierSettings) -> CascadeClassifier:
        encoder = PromptEncoder(cfg.encoder_path) if cfg.encoder_path else None
        return cls(PromptClassifier(cfg.model_path), encoder, threshold=cfg.encoder_threshold)

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def labels(self) -> tuple[str, ...]:
        return self._linear.labels

    @property
    def version(self) -> str:
        """Both models' versions; a prediction's own `version` names the one(s) that made
        it."""
        return self._blended_version

    def first(self, texts: Sequence[str]) -> list[Prediction | Unsure]:
        probs = self._linear.probabilities(texts)
        best = probs.argmax(axis=1)
        labels, version = self._linear.labels, self._linear.version
        return [Unsure(texts[row], probs[row])
                if asks_encoder(texts[row], float(probs[row, k]), self._threshold)
                else Prediction(labels[k], float(probs[row, k]), version)
                for row, k in enumerate(best)]

    def second(self, unsure: Sequence[Unsure]) -> list[Prediction]:
        if not unsure:
            return []
        if self._encoder is None:  # `first` finds nothing unsure without an encoder
            raise ValueError("no encoder to ask")
        encoder = self._encoder.probabilities([u.text for u in unsure])
        linear = np.stack([u.linear for u in unsure])
        logits = (self._weight * np.log(encoder + 1e-9)
                  + (1 - self._weight) * np.log(linear + 1e-9))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [Prediction(self.labels[k], float(probs[row, k]), self._blended_version)
                for row, k in enumerate(best)]

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """One prediction per prompt, in order; a batch gives the same labels as one by one."""
        out = self.first(texts)
        unsure = [(row, p) for row, p in enumerate(out) if isinstance(p, Unsure)]
        for (row, _), p in zip(unsure, self.second([u for _, u in unsure]), strict=True):
            out[row] = p
        return [p for p in out if isinstance(p, Prediction)]
