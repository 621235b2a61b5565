"""The one format of the secret key lists in the environment: "<id>:<material>,<id>:<material>"
(whitespace around entries ignored), with ids of letters, digits, `_`, `.` or `-`. Used by
the vault's master keys (`state/vault.py`, SWITCHYARD_VAULT__MASTER_KEYS) and the session
signing keys (`topics/sessions.py`, SWITCHYARD_AUTH__SIGNING_KEYS); each decodes and checks
its own material. An error names the variable and the key id, never the material."""

from __future__ import annotations

import re
from collections.abc import Callable

KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_keyring(spec: str, *, env: str, example: str, what: str,
                  decode: Callable[[str, str], bytes],
                  misconfigured: Callable[[str], Exception]) -> dict[str, bytes]:
    """The keys of `spec` by id, each decoded by `decode(key_id, text)`. `example` shows an
    entry (e.g. "k1:<key>"), `what` names a key in messages (e.g. "master key")."""
    keys: dict[str, bytes] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        key_id, sep, text = (part.strip() for part in entry.partition(":"))
        if not sep or not KEY_ID.fullmatch(key_id):
            raise misconfigured(f"{env} entries must look like '{example}' with an id of "
                                "letters, digits, '_', '.' or '-'")
        if key_id in keys:
            raise misconfigured(f"{what} id {key_id!r} appears twice in {env}")
        keys[key_id] = decode(key_id, text)
    return keys
