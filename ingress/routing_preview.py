"""POST /v1/routing/preview: which route would serve a request, and why, without calling any
provider. The body is a chat completion's (the seed's `{model, messages, policy?}` included),
validated and admitted exactly as `ingress/chat.py` does; the answer is always JSON, even
for `stream: true` (which still counts as a capability the route needs).

The decision is the router's own: the request travels the normal path with
`routing.preview` set, and the router answers with its decision instead of executing it
(`workers/router/preview.py`, where the shape is described). A preview is not rate limited
nor reserved against budgets: it costs no provider call."""

from __future__ import annotations

from starlette.responses import Response

from ingress.bodies import json_response
from ingress.call import Call
from ingress.chat import CATEGORY_HEADER
from ingress.errors import error_response
from ingress.money import exact_costs
from ingress.pipeline import Submission, client_gone
from ingress.policy import MODE_HEADER, admit, fold_content_parts
from ingress.schema import validate_chat
from topics.errors import InvalidRequest, SwitchyardError, UpstreamError
from topics.routing_policy import CATEGORIES


async def preview(call: Call) -> Response:
    """Which route would serve this chat completion and why (category, eligible routes with
    their posterior means, cost and latency estimates, what excluded the others); no
    provider is called."""
    request, pipeline, owner = call.request, call.services.pipeline, call.principal
    body = fold_content_parts(await pipeline.read_json(request))
    validate_chat(body, pipeline.settings.max_image_bytes)
    catalog = await call.services.tenant_routes.catalog_for(owner.tenant_id)
    admitted = admit(body, catalog, "chat", owner, request.headers.get("x-tenant-id"),
                     request.headers.get(MODE_HEADER))
    hint = request.headers.get(CATEGORY_HEADER)
    if hint is not None and hint not in CATEGORIES:
        raise InvalidRequest(f"{CATEGORY_HEADER} must be one of {', '.join(CATEGORIES)}",
                             code="invalid_header", param=CATEGORY_HEADER)
    first, _ = await pipeline.submit(Submission(
        request_id=call.request_id, owner=owner, endpoint="chat.completions",
        body=admitted.body, routing={**admitted.routing, "preview": True},
        metadata=admitted.metadata,
        timeout_s=pipeline.timeout_s(request, admitted.timeout_ms),
        traceparent=request.headers.get("traceparent"),
        client_gone=lambda: client_gone(request), category=hint))
    pipeline.close(call.request_id)
    if first.kind == "error":
        return error_response(SwitchyardError.from_frame_data(first.data))
    answer = first.data.get("preview")
    if first.kind != "done" or not isinstance(answer, dict):
        return error_response(UpstreamError("the router's preview was incomplete",
                                            code="reply_incomplete"))
    return json_response(exact_costs(answer))
