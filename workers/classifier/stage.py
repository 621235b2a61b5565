"""The classifier stage: each chat request labelled with its prompt category. Requests that
need no label pass straight through: embeddings, a request that already carries a category (a
hint from its producer), and a pinned route.

`Labeller` does the labelling; where it runs is the deployment's choice. `ClassifierStage` is
the stage as its own process (`llm.requests` in, `llm.classified` out); a router started with
`classify_inline` runs the same `Labeller` on `llm.requests` itself, one Kafka hop fewer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from prometheus_client import Histogram

from topics import names
from topics.messages import RequestEnvelope
from topics.tracing import SpanKind, Tracing, current_traceparent, with_header
from workers.batching import MicroBatcher, ThreadBatcher
from workers.classifier.cascade import CascadeClassifier, Unsure
from workers.classifier.metrics import ClassifierMetrics
from workers.classifier.model import Prediction

# Long passages carry little extra signal for the label and cost time.
_MAX_CHARS = 4000
A = TypeVar("A")
B = TypeVar("B")
_PUBLISH = {"messaging.system": "kafka", "messaging.operation.type": "send",
            "messaging.destination.name": names.CLASSIFIED}


class Labeller:
    """Labels requests with the cascade (`cascade.py`): the linear model on the event loop,
    batching everything labelled in one loop turn into one ONNX call; the encoder, for the
    prompts the linear model is unsure of, in a worker thread (milliseconds a call: the loop
    keeps serving meanwhile), taking what queued while its previous call ran in one thread
    hop (the encoder then labels those prompts one by one: `encoder.PromptEncoder`)."""

    def __init__(self, cascade: CascadeClassifier, *, max_batch: int,
                 tracing: Tracing | None = None,
                 metrics: ClassifierMetrics | None = None) -> None:
        self._metrics = metrics
        first: Callable[[Sequence[str]], Sequence[Prediction | Unsure]] = cascade.first
        second: Callable[[Sequence[Unsure]], Sequence[Prediction]] = cascade.second
        if metrics is not None:
            first, second = _timed(first, metrics.duration), _timed(second,
                                                                   metrics.encoder_duration)
        self._first: MicroBatcher[str, Prediction | Unsure] = MicroBatcher(
            first, max_batch=max_batch)
        self._second: ThreadBatcher[Unsure, Prediction] = ThreadBatcher(
            second, max_batch=max_batch)
        self._tracing = tracing or Tracing()

    async def label(self, env: RequestEnvelope) -> RequestEnvelope:
        if not needs_label(env):
            return env
        with self._tracing.span("classify") as span:
            first = await self._first.submit(prompt_text(env.body))
            prediction = (await self._second.submit(first) if isinstance(first, Unsure)
                          else first)
            if span.is_recording():
                span.set_attributes({"switchyard.category": prediction.label,
                                     "switchyard.category.confidence": prediction.confidence,
                                     "switchyard.classifier.version": prediction.version,
                                     "switchyard.classifier.encoder": isinstance(first,
                                                                                 Unsure)})
            if self._metrics is not None:
                self._metrics.labelled(prediction.label)
                path = self._metrics.encoder_path if isinstance(first, Unsure) \
                    else self._metrics.linear_path
                path.inc()
        return env.model_copy(update={"category": prediction.label,
                                      "confidence": round(prediction.confidence, 4),
                                      "classifier_version": prediction.version})


def _timed(run: Callable[[Sequence[A]], Sequence[B]],
           histogram: Histogram) -> Callable[[Sequence[A]], Sequence[B]]:
    def timed(items: Sequence[A]) -> Sequence[B]:
        with histogram.time():
            return run(items)
    return timed


class ClassifierStage:
    def __init__(self, labeller: Labeller, producer: AIOKafkaProducer,
                 tracing: Tracing | None = None) -> None:
        self._labeller = labeller
        self._producer = producer
        self._tracing = tracing or Tracing()

    async def handle(self, env: RequestEnvelope, record: Any) -> None:
        tracing = self._tracing
        with tracing.consume(f"{names.REQUESTS} process", record, request_id=env.request_id):
            env = await self._labeller.label(env)
            with tracing.span(f"{names.CLASSIFIED} publish", kind=SpanKind.PRODUCER,
                              attributes=_PUBLISH):
                # The router's consume span is a child of this one (off: of the ingress's).
                headers = with_header(record.headers, names.H_TRACEPARENT,
                                      current_traceparent())
                # Awaited: the input offset is committed only once the labelled copy is
                # durable.
                await self._producer.send_and_wait(names.CLASSIFIED, env.to_json(),
                                                   key=record.key, headers=headers)


def needs_label(env: RequestEnvelope) -> bool:
    return (env.endpoint == "chat.completions" and env.category is None
            and env.routing.mode != "fixed")


def prompt_text(body: dict[str, Any]) -> str:
    """The last user turn's text: what the classifier was trained on (one prompt)."""
    for message in reversed(body.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "\n".join(str(p.get("text", "")) for p in content
                                    if isinstance(p, dict) and p.get("type") == "text")
            return str(content or "")[:_MAX_CHARS]
    return ""
