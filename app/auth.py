"""API keys listed in the environment (GATEWAY_API_KEYS / GATEWAY_API_KEY_FILE), and the bearer token of a request.
The store's keys, limits and usage are `app.keystore` and `app.tenants`.

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
