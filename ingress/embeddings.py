"""POST /v1/embeddings through the same pipeline as chat: Kafka, router, provider, reply."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from ingress.call import Call
from ingress.money import exact_costs
from ingress.pipeline import Submission, client_gone, request_traceparent
from ingress.policy import MODE_HEADER, admit
from ingress.schema import validate_embeddings
from topics.errors import UpstreamError


async def embeddings(call: Call) -> Response:
    """OpenAI embeddings, for OpenAI-compatible and Gemini embedding models."""
    request, pipeline, owner = call.request, call.services.pipeline, call.principal
    body = await pipeline.read_json(request)
    validate_embeddings(body)
    admitted = admit(body, call.services.catalog, "embedding", owner,
                     request.headers.get("x-tenant-id"), request.headers.get(MODE_HEADER))
    first, _ = await call.services.admission.submit(call, pipeline, Submission(
        request_id=call.request_id, owner=owner, endpoint="embeddings", body=admitted.body,
        routing=admitted.routing, metadata=admitted.metadata,
        timeout_s=pipeline.timeout_s(request, admitted.timeout_ms),
        traceparent=request_traceparent(request),
        client_gone=lambda: client_gone(request)))
    pipeline.close(call.request_id)
    result: Any = first.data.get("embeddings")
    if not isinstance(result, dict):
        raise UpstreamError("the provider's answer was incomplete", code="reply_incomplete")
    result["metadata"] = exact_costs(first.data.get("metadata"))
    return Response(orjson.dumps(result), media_type="application/json")
