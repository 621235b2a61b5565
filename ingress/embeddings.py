"""POST /v1/embeddings through the same pipeline as chat: Kafka, router, provider, reply."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ingress.pipeline import ModelRoute, Submission, client_gone
from ingress.policy import MODE_HEADER, admit
from ingress.schema import validate_embeddings
from topics.errors import UpstreamError


class Embeddings(ModelRoute):
    async def __call__(self, request: Request) -> Response:
        request_id, owner, body = await self._begin(request)
        validate_embeddings(body)
        admitted = admit(body, self._catalog, "embedding", owner,
                         request.headers.get("x-tenant-id"), request.headers.get(MODE_HEADER))
        first, _ = await self._pipeline.submit(Submission(
            request_id=request_id, owner=owner, endpoint="embeddings", body=admitted.body,
            routing=admitted.routing, metadata=admitted.metadata,
            timeout_s=self._pipeline.timeout_s(request, admitted.timeout_ms),
            traceparent=request.headers.get("traceparent"),
            client_gone=lambda: client_gone(request)))
        self._pipeline.close(request_id)
        result: Any = first.data.get("embeddings")
        if not isinstance(result, dict):
            raise UpstreamError("the provider's answer was incomplete", code="reply_incomplete")
        result["metadata"] = first.data.get("metadata")
        return Response(orjson.dumps(result), media_type="application/json")
