"""API keys: who may use the gateway, and under which name a request waits for a slot.

Keys are held as SHA-256 digests and a presented key is compared with every one of them by `hmac.compare_digest`,
with no early exit, so that neither a key's bytes nor its position show in the time a refusal takes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import Scope


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in sorted(set(keys))]

    def __bool__(self) -> bool:
        """Whether auth is on."""
        return bool(self._digests)

    def accepts(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        accepted = False
        for key in self._digests:
            accepted |= hmac.compare_digest(digest, key)
        return accepted


def bearer_token(scope: Scope) -> bytes:
    """The token of the request's `Authorization: Bearer <token>` header, as sent (b"" when there is none)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def client_name(scope: Scope, keys: ApiKeys) -> str:
    """Whose turn a request waits in for a generation slot: its API key when auth is on (only as a digest: the key
    itself is kept nowhere), else the client's address (behind a proxy, its clients share one turn)."""
    if keys:
        return "key:" + hashlib.sha256(bearer_token(scope)).hexdigest()[:16]
    client = scope.get("client")
    return "addr:" + (client[0] if client else "")
