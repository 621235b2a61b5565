"""Message schemas of every topic and channel, validated with pydantic, encoded with orjson.

Each message carries `schema_version`; readers reject versions they do not know (to the DLQ)
rather than guess.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from topics.bandit import ObjectiveWeights

SCHEMA_VERSION: Literal[1] = 1

# auto: the best route, failing over to the next; fixed: one route, no failover; speculative:
# race N routes, keep the first to answer; hedged: start the next route only when the first is
# slower than its usual time to first token; council: N answer, a judge picks.
Mode = Literal["auto", "fixed", "speculative", "hedged", "council"]
MODES: tuple[str, ...] = ("auto", "fixed", "speculative", "hedged", "council")
CouncilOutput = Literal["winner", "synthesis"]
# progress: work under way with nothing to stream yet (council members answering).
FrameKind = Literal["meta", "progress", "chunk", "done", "error"]
Endpoint = Literal["chat.completions", "embeddings"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Any:
        return cls.model_validate_json(raw)


class RoutingOptions(_Message):
    mode: Mode | None = None  # None: the tenant policy's default_mode
    # All 1 (the default; also seed `optimize_for: balanced`): the tenant policy's weights
    # apply. All zeros are accepted: success alone counts.
    weights: ObjectiveWeights = ObjectiveWeights()
    allowed_providers: list[str] | None = None
    # The request's own fallback chain after its model, in order (OpenRouter's `models`).
    # None: the tenant policy's `fallbacks` for that model.
    fallbacks: list[str] | None = None
    price_ceiling_per_mtok: Decimal | None = None
    fallback_enabled: bool = True
    # speculative / hedged: routes started at most; council: members asked.
    routes: int | None = Field(default=None, ge=1, le=8)
    # hedged: start the next route once the first is slower than this percentile of its
    # observed time to first token.
    hedge_percentile: float | None = Field(default=None, gt=0, lt=100)
    judge_model: str | None = None  # council
    council_output: CouncilOutput | None = None
    # POST /v1/routing/preview: the router answers with its decision and why (a `done`
    # frame, `workers/router/preview.py`) instead of calling any provider.
    preview: bool = False


class ReplyTarget(_Message):
    """Exactly one of: a Redis channel (interactive) or a Kafka topic (batch)."""

    channel: str | None = None
    topic: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ReplyTarget:
        if (self.channel is None) == (self.topic is None):
            raise ValueError("reply needs exactly one of channel or topic")
        return self


class RequestEnvelope(_Message):
    """`llm.requests` (and, with classification fields, `llm.classified`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    # No whitespace: a reply channel's frame header is space-separated.
    request_id: str = Field(min_length=1, max_length=128, pattern=r"^\S+$")
    tenant_id: str = Field(min_length=1)
    key_id: str = Field(min_length=1)
    received_at_ms: int
    deadline_ms: int
    endpoint: Endpoint = "chat.completions"
    # The OpenAI request body exactly as the client sent it, unknown fields included.
    body: dict[str, Any]
    routing: RoutingOptions = RoutingOptions()
    # The client's free-form `metadata` object, kept off the provider call.
    metadata: dict[str, Any] | None = None
    reply: ReplyTarget
    category: str | None = None
    confidence: float | None = None
    classifier_version: str | None = None
    # Set by the ingress once the request passed admission (rate limits, spend budgets:
    # `ingress/admission.py`); a request published straight to Kafka (the batch path) has it
    # unset, and the router admits it itself before executing (`workers/router/limits.py`,
    # `workers/router/budgets.py`). The router trusts it only with the admission's
    # reservations behind it in Redis: a batch producer can set the field, not make those.
    admitted: bool = False


class ReplyFrame:
    """One step of a reply. `seq` starts at 0 and has no gaps; a gap means lost frames.

    On a Kafka reply topic a frame is one JSON message `{request_id, seq, kind, data}`. On a
    Redis reply channel (router → ingress) it is `encode_frame`'s header line followed by
    `data`'s JSON as it is: the ingress relays a chunk's bytes to its client without parsing
    them (parsing built five dicts per chunk, and their garbage collection cost the ingress
    more than the relay itself); other kinds are parsed and checked on arrival."""

    __slots__ = ("_data", "kind", "raw", "request_id", "seq")

    def __init__(self, request_id: str, seq: int, kind: FrameKind, raw: bytes,
                 data: dict[str, Any] | None = None) -> None:
        self.request_id = request_id
        self.seq = seq
        self.kind = kind
        self.raw = raw  # `data` as JSON
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = _json_object(self.raw)
        return self._data


_FRAME_KINDS: dict[bytes, FrameKind] = {b"meta": "meta", b"progress": "progress",
                                        b"chunk": "chunk", b"done": "done", b"error": "error"}


def encode_frame(request_id: str, seq: int, kind: FrameKind, data: bytes) -> bytes:
    """A frame for a reply channel: `<request_id> <seq> <kind> <len(data)>\\n` then `data`
    (JSON). A channel message is one or more of them back to back."""
    return b"%s %d %s %d\n%s" % (request_id.encode(), seq, kind.encode(), len(data), data)


def parse_frames(raw: bytes) -> list[ReplyFrame]:
    """The frames of one reply-channel message. Raises ValueError if any is malformed."""
    if not raw:
        raise ValueError("an empty reply message: no frames")
    frames = []
    pos, end = 0, len(raw)
    while pos < end:
        eol = raw.find(b"\n", pos)
        header = raw[pos:eol].split(b" ") if eol >= 0 else []  # no newline: no header
        if len(header) != 4 or header[2] not in _FRAME_KINDS \
                or not (header[1].isdigit() and header[3].isdigit()):
            raise ValueError(f"not a reply frame header: {raw[pos:pos + 120]!r}")
        pos = eol + 1 + int(header[3])
        if pos > end:
            raise ValueError(f"reply frame cut short: {raw[eol + 1:eol + 121]!r}")
        kind = _FRAME_KINDS[header[2]]
        data = raw[eol + 1:pos]
        # A chunk is relayed as it is; what the ingress acts on is checked now.
        parsed = None if kind == "chunk" else _json_object(data)
        frames.append(ReplyFrame(header[0].decode(), int(header[1]), kind, data, parsed))
    return frames


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"reply frame data is not JSON ({exc}): {raw[:120]!r}") from None
    if type(decoded) is not dict:
        raise ValueError(f"reply frame data is not an object: {raw[:120]!r}")
    return decoded


class CancelRequest(_Message):
    """Published by an ingress whose client went away; every router listens."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    reason: str = "client_disconnected"


RevocationKind = Literal["key", "tenant", "token"]


class Revocation(_Message):
    """Published on the revocations channel when a credential stops being valid: an API key
    revoked or changed (rotation sets its expiry), a tenant suspended or resumed, a session
    token logged out. Every ingress and router listens (`state/revocations.py`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: RevocationKind
    id: str = Field(min_length=1, max_length=256)  # the key, tenant or token id
    # A token's own expiry (unix ms): after it, the token is refused anyway and its
    # revocation can be forgotten. Tokens only.
    expires_at_ms: int | None = None

    @model_validator(mode="after")
    def _token_expiry(self) -> Revocation:
        if (self.kind == "token") != (self.expires_at_ms is not None):
            raise ValueError("expires_at_ms is required for a token, and only for a token")
        return self


UsageStatus = Literal["ok", "error", "cancelled", "timeout"]


class UsageEvent(_Message):
    """`llm.usage`: one event per attempt that reached a provider, and one per request
    answered from the response cache (`cache_hit`). JSON Schema published in
    `topics/schemas/usage.v1.json` for analytics consumers."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    request_id: str
    tenant_id: str
    key_id: str
    provider: str
    model: str
    category: str | None = None
    mode: Mode = "auto"
    status: UsageStatus
    error_code: str | None = None
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    estimated: bool = False
    cost_usd: Decimal = Field(ge=0)
    latency_ms: float = Field(ge=0)
    ttft_ms: float | None = None
    attempt: int = Field(default=1, ge=1)
    started_at_ms: int
    finished_at_ms: int
    # Answered from the response cache by the ingress (`ingress/response_cache.py`): no
    # provider was called; cost and tokens are 0.
    cache_hit: bool = False


def usage_json_schema() -> dict[str, Any]:
    """The JSON Schema published for analytics consumers of `llm.usage`."""
    schema = UsageEvent.model_json_schema(mode="serialization")
    schema["$id"] = "https://switchyard.dev/schemas/usage.v1.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
