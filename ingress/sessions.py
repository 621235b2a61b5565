"""Sessions: POST /v1/auth/login (an API key in the body → a session token), POST
/v1/auth/refresh and POST /v1/auth/logout (the session token as the bearer).

A session token is accepted wherever an API key is, with that key's permissions
(`ingress/auth.py`, `SessionVerifier`). A refresh revokes the token it replaces: one token
per session is alive at a time, and a refresh is single-use (two racing for the same token:
one wins, the other gets 401 `token_revoked`). A logout revokes the token on every ingress
process (`state/sessions.py`). The token itself: `topics/sessions.py`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ingress.auth import SessionVerifier
from ingress.bodies import json_response, read_body
from ingress.call import Call
from ingress.validation import parse_json_object, parse_model
from state.keys import KeyRecord
from state.sessions import revoke
from topics.errors import InvalidRequest, Unauthorized, Unavailable
from topics.identity import Permission
from topics.sessions import ACTIVE_KEY_ENV, SIGNING_KEYS_ENV, SessionClaims

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096


class Login(BaseModel):
    # strict: a number is not a key; unknown fields are typos.
    model_config = ConfigDict(extra="forbid", strict=True)
    api_key: str = Field(min_length=1, max_length=1024)


async def login(call: Call) -> Response:
    """Open a session for an API key, `{api_key}` → `{token, expires_at, tenant_id, …}`."""
    body = parse_json_object(await read_body(call.request, MAX_BODY_BYTES))
    if "api_key" not in body and ("email" in body or "password" in body):
        raise InvalidRequest("this gateway has no user accounts: log in with an API key, "
                             '`{"api_key": "sy-…"}`', code="unsupported_login", param="email")
    # The route is public (the key is in the body, not the header); the key goes through the
    # same lookup, cache and checks as a bearer key, and its role must grant `session`.
    record = await call.services.auth.api_key_record(parse_model(Login, body).api_key)
    record.principal().require(Permission.SESSION)
    sessions = _configured(call)
    response, claims = _issue(sessions, record)
    log.info("key %s of tenant %s opened session %s", record.key_id, record.tenant_id,
             claims.jti)
    # A public route: the caller is the key from the body.
    await call.services.audit.record(call, "auth.login", target=claims.jti,
                                     tenant_id=record.tenant_id, actor=record.key_id,
                                     actor_role=record.role.value)
    return response


async def refresh(call: Call) -> Response:
    """Replace the bearer session token with a new one (same shape as login); the old one
    stops working."""
    sessions, claims = _bearer_session(call)
    record = await sessions.usable_record(claims)
    if not await _revoke(call, sessions, claims):
        raise Unauthorized("this session token was already refreshed or logged out: log in "
                           "again", code="token_revoked")
    response, renewed = _issue(sessions, record)
    log.info("session %s of key %s refreshed as %s", claims.jti, record.key_id, renewed.jti)
    await call.services.audit.record(call, "auth.refresh", target=renewed.jti,
                                     details={"replaces": claims.jti})
    return response


async def logout(call: Call) -> Response:
    """End the bearer session token on every ingress → 204."""
    sessions, claims = _bearer_session(call)
    await _revoke(call, sessions, claims)
    log.info("session %s of key %s logged out", claims.jti, claims.key_id)
    await call.services.audit.record(call, "auth.logout", target=claims.jti)
    return Response(status_code=204)


def _configured(call: Call) -> SessionVerifier:
    if call.services.sessions is None:
        raise Unavailable(f"sessions are not configured: set {SIGNING_KEYS_ENV} (e.g. "
                          f"'s1:<32 bytes in base64url>'; `switchyard auth new-signing-key` "
                          f"prints one) and {ACTIVE_KEY_ENV}", code="sessions_not_configured",
                          retryable=False)
    return call.services.sessions


def _bearer_session(call: Call) -> tuple[SessionVerifier, SessionClaims]:
    """The claims of the bearer session token (verified by `ingress/call.py` already; read
    again here for its id and expiry, which a principal does not carry)."""
    if call.principal.session_id is None or call.services.sessions is None:
        raise Unauthorized("this route takes a session token as the bearer (from POST "
                           "/v1/auth/login), not an API key", code="session_token_required")
    sessions = call.services.sessions
    _, _, token = call.request.headers.get("authorization", "").partition(" ")
    return sessions, sessions.claims(token.strip())


async def _revoke(call: Call, sessions: SessionVerifier, claims: SessionClaims) -> bool:
    # Until the token could no longer verify anywhere: its expiry plus the clock leeway.
    until_s = claims.expires_at + sessions.codec.leeway_s
    revoked = await revoke(call.services.redis, claims.jti, until_s)
    # This process refuses it at once, without waiting for its own broadcast.
    sessions.revoked.add(claims.jti, int(until_s * 1000))
    return revoked


def _issue(sessions: SessionVerifier, record: KeyRecord) -> tuple[Response, SessionClaims]:
    not_after = None if record.expires_at is None else record.expires_at.timestamp()
    token, claims = sessions.codec.issue(record.principal(), not_after=not_after)
    body = {
        "token": token,
        "token_type": "Bearer",
        "expires_at": _rfc3339(claims.expires_at),
        "expires_in": claims.expires_at - claims.issued_at,
        "issued_at": _rfc3339(claims.issued_at),
        "tenant_id": claims.tenant_id,
        "key_id": claims.key_id,
        "role": claims.role.value,
        "allowed_models": None if claims.allowed_models is None
        else sorted(claims.allowed_models),
        "session_id": claims.jti,
    }
    return json_response(body), claims


def _rfc3339(unix_s: int) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")
