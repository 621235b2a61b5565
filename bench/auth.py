"""The ingress's authentication step alone, in process: what a request costs to authenticate
with a cached API key and with a session token (`ingress/auth.py`), and how many key lookups
(database round trips) each makes over many requests. The lookup is a counter returning one
record: what is measured is our code around it, not PostgreSQL.

    python -m bench.auth [--requests 100000]

Prints microseconds per request (best of 5 runs) and the lookups made; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pydantic import SecretStr

from ingress.auth import Authenticator, SessionVerifier
from state.keys import KeyRecord
from state.sessions import RevokedTokens
from topics.identity import Role
from topics.sessions import SessionCodec, SigningKeys
from topics.settings import AuthSettings

_RECORD = KeyRecord(key_id="k_bench", tenant_id="t_bench", role=Role.MEMBER,
                    allowed_models=None, expires_at=None, tenant_suspended=False)


async def _per_request_us(auth: Authenticator, header: str, requests: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(requests):
            await auth.authenticate(header)
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    return best


async def main(requests: int) -> None:
    lookups = {"key": 0, "key id": 0}

    async def by_key(_key: str) -> KeyRecord:
        lookups["key"] += 1
        return _RECORD

    async def by_id(_key: tuple[str, str]) -> KeyRecord:
        lookups["key id"] += 1
        return _RECORD

    codec = SessionCodec.from_settings(AuthSettings(
        signing_keys=SecretStr(SigningKeys.generate("s1")), active_signing_key="s1"))
    assert codec is not None
    sessions = SessionVerifier(codec, RevokedTokens(), by_id, ttl_s=3600, negative_ttl_s=2)
    auth = Authenticator(by_key, ttl_s=3600, negative_ttl_s=2, sessions=sessions)
    token, _ = codec.issue(_RECORD.principal())

    key_us = await _per_request_us(auth, "Bearer sy-" + "x" * 43, requests)
    token_us = await _per_request_us(auth, f"Bearer {token}", requests)
    started = time.perf_counter()
    for _ in range(1000):
        codec.verify(token)
    verify_us = (time.perf_counter() - started) / 1000 * 1e6
    runs = 5 * requests
    print(f"API key, cached:        {key_us:6.2f} us per request, {lookups['key']} lookups "
          f"in {runs} requests")
    print(f"session token:          {token_us:6.2f} us per request, {lookups['key id']} lookups "
          f"in {runs} requests")
    print(f"token's first use only: {verify_us:6.2f} us (signature and claims, PyJWT)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().requests))
