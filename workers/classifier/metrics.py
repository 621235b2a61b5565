"""Prometheus metrics of the prompt classifier, wherever it runs: the classifier stage's
process, or a router that classifies inline (`workers/classifier/stage.py` `Labeller`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# One ONNX call on a batch of up to `classifier.max_batch` prompts: ~0.2 ms a prompt.
_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ClassifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "switchyard_classifier_duration_seconds", "One classifier call (a batch of the "
            "prompts labelled in one loop turn)", buckets=_BUCKETS_S, registry=registry)
        self._labels = Counter(
            "switchyard_classifier_labels_total", "Prompts labelled, by the category given",
            ["category"], registry=registry)
        self._children: dict[str, Counter] = {}
        self.encoder_duration = Histogram(
            "switchyard_classifier_encoder_duration_seconds", "One call of the prompt encoder "
            "(the prompts the linear model was unsure of, batched while the previous call "
            "ran)", buckets=_BUCKETS_S, registry=registry)
        paths = Counter(
            "switchyard_classifier_prompts_total", "Prompts labelled, by the path that "
            "labelled them: the linear model alone, or blended with the encoder's opinion",
            ["path"], registry=registry)
        self.linear_path, self.encoder_path = paths.labels("linear"), paths.labels("encoder")

    def labelled(self, category: str) -> None:
        child = self._children.get(category)
        if child is None:  # the model's labels: a handful
            child = self._children[category] = self._labels.labels(category)
        child.inc()
