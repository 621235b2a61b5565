"""Session tokens: what `POST /v1/auth/login` hands out for an API key, a JWT signed with
HMAC-SHA256 by PyJWT (never by hand), and how one is verified.

A token's header names the signing key (`kid`); its claims are `iss`, `aud`, `sub` (the id
of the API key the session was opened with), `tenant_id`, `role`, `allowed_models` (only
when the key is limited), `jti` (the session's id, what a logout revokes), `iat` and `exp`.
Every configured key verifies; only the active one signs, so a new key is rolled in beside
the old one without downtime (`AuthSettings`, docs/tenancy.md).

Verification here is the part that needs no I/O: signature, algorithm, issuer, audience,
expiry, the claims' shapes. The other files of the feature: `state/sessions.py` keeps the
revoked token ids in Redis and broadcasts them; `ingress/auth.py` (`SessionVerifier`) adds
the revocation and the key's current record to turn a token into a `Principal`;
`ingress/sessions.py` serves login, refresh and logout.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from topics.errors import SwitchyardError, Unauthorized
from topics.identity import Principal, Role
from topics.keyring import KEY_ID, parse_keyring
from topics.settings import AuthSettings

ALGORITHM = "HS256"  # the only one accepted: never read from the token (RFC 8725 §2.1)
MIN_SECRET_BYTES = 32  # HS256's own output size; shorter secrets are guessable faster
SIGNING_KEYS_ENV = "SWITCHYARD_AUTH__SIGNING_KEYS"
ACTIVE_KEY_ENV = "SWITCHYARD_AUTH__ACTIVE_SIGNING_KEY"
_REQUIRED = ["iss", "aud", "sub", "jti", "iat", "exp"]


def _misconfigured(message: str) -> SwitchyardError:
    return SwitchyardError(message, code="sessions_misconfigured")


def invalid_token(why: str) -> Unauthorized:
    return Unauthorized(f"invalid session token: {why}", code="invalid_token")


def token_expired() -> Unauthorized:
    return Unauthorized("the session token has expired: log in again (or refresh before it "
                        "expires)", code="token_expired")


def _decode_secret(key_id: str, text: str) -> bytes:
    """base64url or standard base64, padding optional."""
    text = text.replace("+", "-").replace("/", "_").rstrip("=")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < MIN_SECRET_BYTES:
        # Never echo the value: a near-miss of a signing key is still most of one.
        raise _misconfigured(f"signing key {key_id!r} in {SIGNING_KEYS_ENV} is not base64 of "
                             f"at least {MIN_SECRET_BYTES} bytes")
    return raw


class SigningKeys:
    """The configured signing keys by id; only the active one signs."""

    __slots__ = ("_secrets", "active_id")

    def __init__(self, secrets: Mapping[str, bytes], active_id: str) -> None:
        if active_id not in secrets:
            raise _misconfigured(f"{ACTIVE_KEY_ENV}={active_id!r} names no key in "
                                 f"{SIGNING_KEYS_ENV} (configured: {', '.join(secrets) or 'none'})")
        if any(len(s) < MIN_SECRET_BYTES for s in secrets.values()):
            raise _misconfigured(f"every signing key must be at least {MIN_SECRET_BYTES} bytes")
        self._secrets = dict(secrets)
        self.active_id = active_id

    @classmethod
    def parse(cls, spec: str, active_id: str) -> SigningKeys:
        """From "s1:<secret>,s2:<secret>" (`topics/keyring.py`)."""
        secrets = parse_keyring(spec, env=SIGNING_KEYS_ENV, example="s1:<secret>",
                                what="signing key", decode=_decode_secret,
                                misconfigured=_misconfigured)
        return cls(secrets, active_id.strip())

    @staticmethod
    def generate(key_id: str) -> str:
        """A fresh random signing key in the environment's format: "<id>:<base64url>"."""
        if not KEY_ID.fullmatch(key_id):
            raise ValueError("a signing key id is letters, digits, '_', '.' or '-'")
        secret = base64.urlsafe_b64encode(os.urandom(MIN_SECRET_BYTES)).decode().rstrip("=")
        return f"{key_id}:{secret}"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._secrets)

    def secret(self, key_id: str) -> bytes | None:
        return self._secrets.get(key_id)

    def __repr__(self) -> str:
        return f"SigningKeys(ids={list(self._secrets)!r}, active_id={self.active_id!r})"


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a verified token says. Times are unix seconds."""

    key_id: str
    tenant_id: str
    role: Role
    allowed_models: frozenset[str] | None
    jti: str
    issued_at: int
    expires_at: int


class SessionCodec:
    """Signs and verifies session tokens with the configured keys."""

    def __init__(self, keys: SigningKeys, settings: AuthSettings) -> None:
        self.keys = keys
        self.ttl_s = settings.session_ttl_s
        self.leeway_s = settings.clock_leeway_s
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._jwt = jwt.PyJWT({"require": _REQUIRED, "enforce_minimum_key_length": True})

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> SessionCodec | None:
        """None when no signing key is configured (logins then answer 503); a malformed
        configuration raises, naming the key, never its value."""
        spec = settings.signing_keys.get_secret_value()
        if not spec.strip():
            return None
        return cls(SigningKeys.parse(spec, settings.active_signing_key), settings)

    def issue(self, principal: Principal, *, not_after: float | None = None,
              now: float | None = None) -> tuple[str, SessionClaims]:
        """A new token for `principal`, valid `session_ttl_s` from `now` (never past
        `not_after`, the key's own expiry)."""
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + self.ttl_s
        if not_after is not None:
            expires_at = min(expires_at, int(not_after))
        claims = SessionClaims(key_id=principal.key_id, tenant_id=principal.tenant_id,
                               role=principal.role, allowed_models=principal.allowed_models,
                               jti=uuid.uuid4().hex, issued_at=issued_at, expires_at=expires_at)
        payload: dict[str, Any] = {
            "iss": self._issuer, "aud": self._audience, "sub": claims.key_id,
            "tenant_id": claims.tenant_id, "role": claims.role.value, "jti": claims.jti,
            "iat": claims.issued_at, "exp": claims.expires_at}
        if claims.allowed_models is not None:
            payload["allowed_models"] = sorted(claims.allowed_models)
        active = self.keys.active_id
        secret = self.keys.secret(active)
        assert secret is not None  # SigningKeys checks the active id at construction
        token = self._jwt.encode(payload, secret, algorithm=ALGORITHM,
                                 headers={"kid": active})
        return token, claims

    def expired(self, claims: SessionClaims, now: float | None = None) -> bool:
        """Whether a token verified earlier has expired since (PyJWT's rule: `exp` at or
        before now minus the leeway)."""
        return claims.expires_at <= (time.time() if now is None else now) - self.leeway_s

    def verify(self, token: str) -> SessionClaims:
        """The claims of a token signed by a configured key, unexpired, for this issuer and
        audience; else 401 `token_expired` or `invalid_token` (saying why, never echoing the
        token)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid_token("malformed") from None
        key_id = header.get("kid")
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise invalid_token("no valid key id (kid) in its header")
        secret = self.keys.secret(key_id)
        if secret is None:
            raise invalid_token(f"signed with key {key_id!r}, which is not configured (any "
                                "more): log in again")
        try:
            payload = self._jwt.decode(token, secret, algorithms=[ALGORITHM],
                                       audience=self._audience, issuer=self._issuer,
                                       leeway=self.leeway_s)
        except jwt.ExpiredSignatureError:
            raise token_expired() from None
        except jwt.InvalidTokenError as exc:
            raise invalid_token(_why(exc)) from None
        return _claims(payload)


def _why(exc: jwt.InvalidTokenError) -> str:
    # Fixed phrases: the library's messages may change, and ours must never carry token text.
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the signature does not match"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return f"the algorithm is not {ALGORITHM}"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience (aud)"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer (iss)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the claim {exc.claim!r} is missing"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "not valid yet (iat or nbf in the future)"
    return "malformed"


def _claims(payload: dict[str, Any]) -> SessionClaims:
    # A token that verifies was signed by us, so these hold unless a signing key leaked or
    # another program shares it; checked anyway so that no odd value goes further.
    fields = [payload.get(k) for k in ("sub", "tenant_id", "role", "jti")]
    strings = [v for v in fields if isinstance(v, str) and v]
    if len(strings) != len(fields):
        raise invalid_token("sub, tenant_id, role and jti must be strings")
    key_id, tenant_id, role, jti = strings
    try:
        parsed_role = Role(role)
    except ValueError:
        raise invalid_token("unknown role") from None
    models = payload.get("allowed_models")
    if models is not None and not (isinstance(models, list)
                                   and all(isinstance(m, str) for m in models)):
        raise invalid_token("allowed_models must be a list of strings")
    return SessionClaims(key_id=key_id, tenant_id=tenant_id, role=parsed_role,
                         allowed_models=None if models is None else frozenset(models),
                         jti=jti, issued_at=int(payload["iat"]),
                         expires_at=int(payload["exp"]))
