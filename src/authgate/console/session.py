"""Console sessions: a random id in a signed cookie, the session itself in Redis.

The cookie carries `<id>.<signature>`; Redis holds, under a hash of the id, the signed-in
management token's id (never its value), the CSRF secret and the expiry. Signing out
deletes the Redis key, so a copied cookie stops working at once; the key's TTL ends an
idle session. Revoking, disabling or expiring the management token ends its sessions too,
because every request looks the token up again by its id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..backend import mapped_errors

COOKIE = "authgate_console"


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    token_id: str  # the signed-in management token's id (`tok_…`)
    csrf: str
    created_at: float


class SessionStore:
    def __init__(self, redis: Any, key_prefix: str, pepper: bytes, ttl: float) -> None:
        self.redis = redis
        self.ttl = ttl
        self._prefix = f"{key_prefix}:console:"
        # Separate keys derived from the pepper: one signs cookies, one names Redis keys.
        self._sign_key = hmac.new(pepper, b"authgate console cookie", hashlib.sha256).digest()
        self._name_key = hmac.new(pepper, b"authgate console session", hashlib.sha256).digest()

    def _key(self, session_id: str) -> str:
        digest = hmac.new(self._name_key, session_id.encode(), hashlib.sha256).hexdigest()
        return self._prefix + digest

    def _sign(self, session_id: str) -> str:
        return hmac.new(self._sign_key, session_id.encode(), hashlib.sha256).hexdigest()[:32]

    def cookie_value(self, session: Session) -> str:
        return f"{session.id}.{self._sign(session.id)}"

    async def create(self, token_id: str) -> Session:
        session = Session(
            secrets.token_urlsafe(32), token_id, secrets.token_urlsafe(32), time.time()
        )
        body = orjson.dumps({"t": session.token_id, "csrf": session.csrf, "at": session.created_at})
        async with mapped_errors():
            await self.redis.set(self._key(session.id), body, ex=max(1, int(self.ttl)))
        return session

    async def load(self, cookie: str | None) -> Session | None:
        """The session a cookie names, or None (absent, forged, expired or signed out)."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 200:
            return None
        session_id, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(session_id)):
            return None
        async with mapped_errors():
            raw = await self.redis.get(self._key(session_id))
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Session(session_id, data["t"], data["csrf"], data["at"])

    async def end(self, session: Session) -> None:
        async with mapped_errors():
            await self.redis.delete(self._key(session.id))

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(session.csrf, sent or "")

    async def spend(self, nonce: str | None) -> bool:
        """True the first time a form's one-time value is used: a create or rotate form
        posted again (reload, back and resubmit) is refused instead of minting again."""
        if not nonce or len(nonce) > 100:
            return False
        key = self._key("once:" + nonce)
        async with mapped_errors():
            fresh = await self.redis.set(key, b"1", nx=True, ex=max(1, int(self.ttl)))
        return bool(fresh)
