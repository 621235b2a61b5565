"""The prompt classifier at serving time: one onnxruntime session over the versioned model
file, labelling a batch of prompts per call (the stage batches concurrent messages)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from workers.classifier import features


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    confidence: float  # the model's probability for `label`, in (0, 1]
    version: str


class OnnxModel:
    """A versioned model file, loaded (nothing happens at import): its onnxruntime session,
    its version and its labels. The version: the file name says which model line, the digest
    which exact weights. Thread-safe: onnxruntime sessions may be run concurrently."""

    def __init__(self, model_path: Path | str) -> None:
        path = Path(model_path)
        data = path.read_bytes()
        self._version = f"{path.stem}+{hashlib.sha256(data).hexdigest()[:12]}"
        options = ort.SessionOptions()
        # One thread, sequential: the worker is one of many processes on a 2-core box, and a
        # few prompts are far too small to gain from intra-op parallelism.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self._meta: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._labels: tuple[str, ...] = tuple(json.loads(self._meta["labels"]))

    @property
    def version(self) -> str:
        return self._version

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels


class PromptClassifier(OnnxModel):
    """The linear model: n-gram features and the linear layer in one graph."""

    def probabilities(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """(len(texts), len(labels)) float32 probabilities, columns in `labels` order."""
        if not texts:
            return np.zeros((0, len(self._labels)), dtype=np.float32)
        out = self._session.run([features.PROBABILITIES], features.prepare(texts))
        return np.asarray(out[0], dtype=np.float32)

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """One prediction per prompt, in order; a batch gives the same labels as one by one."""
        probs = self.probabilities(texts)
        best = probs.argmax(axis=1)
        return [Prediction(self._labels[k], float(probs[row, k]), self._version)
                for row, k in enumerate(best)]
