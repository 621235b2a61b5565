"""POST /v1/embeddings through the same pipeline as chat: Kafka, router, provider, reply."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import Authenticator
from ingress.pipeline import Pipeline, Submission
from ingress.policy import admit
from ingress.schema import parse_json_object, validate_embeddings
from topics.catalog import Catalog
from topics.errors import UpstreamError


class Embeddings:
    def __init__(self, pipeline: Pipeline, auth: Authenticator, catalog: Catalog) -> None:
        self._pipeline = pipeline
        self._auth = auth
        self._catalog = catalog

    async def __call__(self, request: Request) -> Response:
        request_id: str = request.scope["state"]["request_id"]
        owner = await self._auth.authenticate(request.headers.get("authorization"))
        body = parse_json_object(await self._pipeline.read_body(request))
        validate_embeddings(body)
        admitted = admit(body, self._catalog, "embedding", owner,
                         request.headers.get("x-tenant-id"))
        first, _ = await self._pipeline.submit(Submission(
            request_id=request_id, owner=owner, endpoint="embeddings", body=admitted.body,
            routing=admitted.routing, metadata=admitted.metadata,
            timeout_s=self._pipeline.timeout_s(request, admitted.timeout_ms),
            traceparent=request.headers.get("traceparent")))
        self._pipeline.close(request_id)
        result: Any = first.data.get("embeddings")
        if not isinstance(result, dict):
            raise UpstreamError("the provider's answer was incomplete", code="reply_incomplete")
        result["metadata"] = first.data.get("metadata")
        return Response(orjson.dumps(result), media_type="application/json")
