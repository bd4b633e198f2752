"""The pepper's fingerprint in Redis, and rotating the pepper without downtime.

Tokens are stored under HMAC(pepper, token). Under another pepper every token is simply
unknown, which looks like a flood of TOKEN_INVALID rather than a configuration error. So
the first process that uses a Redis stores a fingerprint there, HMAC(pepper, a fixed
label): it identifies the pepper and reveals nothing about it (the pepper is at least 32
characters, so it cannot be guessed from the fingerprint). `serve`, every CLI command and
`config check` compare it with their own and refuse a different pepper with one line.

Rotation, with `AUTHGATE_PEPPER` = the new pepper and `AUTHGATE_PEPPER_PREVIOUS` = the old:
1. Roll the new settings out. A token the new hash does not find is looked up under the
   old one (only on a cache miss that Redis already answered "unknown", so the hot path
   pays nothing, and nothing at all when no previous pepper is set). Nothing is moved yet:
   pods still running the old pepper alone keep working.
2. `authgate pepper rekey` makes the new pepper the stored one and lists every token as
   pending. From then on a pending token found under its old hash is moved to its new one
   on use. The hash cannot be recomputed without the token, which is never stored, so
   tokens are re-keyed as they are used, and `pepper rekey` run again reports progress.
3. When no active token is pending, it says so: drop `AUTHGATE_PEPPER_PREVIOUS`. Revoked,
   expired or unused tokens left under the old hash are then refused as unknown.

Keys: `{kp}:pepper` (fingerprint of the stored pepper), `{kp}:pepper:previous` (fingerprint
of the old one while re-keying), `{kp}:pepper:pending` (hash: token id -> old hash).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .backend import mapped_errors
from .config import Settings
from .errors import ConfigError
from .model import status_of
from .tokens import Hasher

LABEL = b"authgate pepper fingerprint"
STATE_TTL = 5.0  # seconds a worker trusts what it last read about a rotation in progress


def fingerprint(pepper: bytes) -> str:
    """A keyed derivation of the pepper that identifies it without revealing it."""
    return hmac.digest(pepper, LABEL, "sha256").hex()[:32]


def _keys(settings: Settings) -> tuple[str, str, str]:
    kp = settings.key_prefix
    return f"{kp}:pepper", f"{kp}:pepper:previous", f"{kp}:pepper:pending"


def mismatch(stored: str) -> ConfigError:
    return ConfigError(
        "AUTHGATE_PEPPER: this is not the pepper the tokens in this Redis were made with "
        f"(stored fingerprint {stored[:8]}…); set the right one, or rotate to a new pepper "
        "with the old one in AUTHGATE_PEPPER_PREVIOUS"
    )


async def verify(redis: Any, settings: Settings, *, store: bool = True) -> str:
    """Store the fingerprint on first use (unless `store` is false); ConfigError if Redis
    holds another pepper's. Returns which configured pepper the stored one is: "current",
    "previous", or "none" (nothing stored yet and `store` false)."""
    key, _, _ = _keys(settings)
    mine = fingerprint(settings.pepper.reveal())
    async with mapped_errors():
        if store:
            await redis.set(key, mine, nx=True)
        raw = await redis.get(key)
    if raw is None:
        return "none"
    stored = raw.decode() if isinstance(raw, bytes) else str(raw)
    if hmac.compare_digest(stored, mine):
        return "current"
    previous = settings.pepper_previous
    if previous is not None and hmac.compare_digest(stored, fingerprint(previous.reveal())):
        return "previous"
    raise mismatch(stored)


@dataclass(frozen=True, slots=True)
class Progress:
    started: bool  # whether this call began the re-keying
    total: int  # tokens listed as pending when it began
    pending: list[dict[str, Any]]  # still under the old hash: id, display_prefix, status
    active: int  # how many of those are active

    @property
    def done(self) -> bool:
        return self.active == 0


async def rekey(store: Any) -> Progress:
    """Begin re-keying (the first call) or report how far it is (later calls)."""
    settings: Settings = store.settings
    if settings.pepper_previous is None:
        raise ConfigError(
            "AUTHGATE_PEPPER_PREVIOUS: required to re-key (the pepper the tokens were made with)"
        )
    key, previous_key, pending_key = _keys(settings)
    redis = store.redis
    which = await verify(redis, settings)
    started = False
    if which == "previous":
        async with mapped_errors():
            ids = [i.decode() for i in await redis.zrange(store.ids_key, 0, -1)]
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                pipe = redis.pipeline(transaction=False)
                for token_id in batch:
                    pipe.get(store._ti + token_id)
                digests = await pipe.execute()
                found = {i: d.decode() for i, d in zip(batch, digests, strict=True) if d}
                if found:
                    await redis.hset(pending_key, mapping=found)
            await redis.set(previous_key, fingerprint(settings.pepper_previous.reveal()))
            await redis.set(key, fingerprint(settings.pepper.reveal()))
        started = True
    async with mapped_errors():
        pending_raw = await redis.hgetall(pending_key)
        total = int(await redis.hlen(pending_key))
    now = time.time()
    rows: list[dict[str, Any]] = []
    entries = sorted(pending_raw.items())
    for start in range(0, len(entries), 500):
        batch = entries[start : start + 500]
        async with mapped_errors():
            pipe = redis.pipeline(transaction=False)
            for _, digest in batch:
                pipe.get(store._th + digest.decode())
            raws = await pipe.execute()
        for (token_id, _), raw in zip(batch, raws, strict=True):
            if raw is None:  # deleted, or moved by a worker a moment ago
                async with mapped_errors():
                    await redis.hdel(pending_key, token_id)
                continue
            record = orjson.loads(raw)
            rows.append(
                {
                    "id": token_id.decode(),
                    "display_prefix": record.get("display_prefix", ""),
                    "status": status_of(record, now),
                }
            )
    active = sum(1 for r in rows if r["status"] == "active")
    if active == 0 and not started:
        async with mapped_errors():  # nothing left to move: the workers may stop looking
            await redis.delete(previous_key)
            await redis.delete(pending_key)
    return Progress(started, total, rows, active)


class PreviousPepper:
    """The data plane's look-up under the old pepper, for tokens the new hash did not find.

    `Authorizer` holds one only while `AUTHGATE_PEPPER_PREVIOUS` is set, and asks it only
    after Redis has answered "unknown" for the new hash.
    """

    def __init__(self, settings: Settings, store: Any) -> None:
        assert settings.pepper_previous is not None
        self._hash = Hasher(settings.pepper_previous.reveal()).digest
        self.store = store
        self._current = fingerprint(settings.pepper.reveal())
        self._key, _, self._pending = _keys(settings)
        self._rekeying = False
        self._checked = float("-inf")

    @classmethod
    def of(cls, settings: Settings, store: Any) -> PreviousPepper | None:
        return None if settings.pepper_previous is None else cls(settings, store)

    def digest(self, token: str) -> bytes:
        """The token's hash under the previous pepper."""
        return self._hash(token)

    async def record(self, token: str, key: bytes) -> Any:
        """The stored record of `token` under the old hash (None if not there), moved to
        the new hash `key` once `pepper rekey` has begun."""
        old = self._hash(token).hex()
        store = self.store
        async with mapped_errors():
            raw = await store.redis.get(store._th + old)
        if raw is None:
            if self._rekeying:  # a concurrent request may have just moved it
                return await store.record_by_hash(key.hex())
            return None
        now = time.monotonic()
        if now - self._checked > STATE_TTL:
            async with mapped_errors():
                stored = await store.redis.get(self._key)
            self._rekeying = stored is not None and stored.decode() == self._current
            self._checked = now
        if self._rekeying:
            await self._move(old, key.hex(), raw)
        return orjson.loads(raw)

    async def load(
        self,
        token: str,
        key: bytes,
        compile_record: Callable[[bytes, Any, float, int], Any],
        generation: int,
    ) -> Any:
        """The entry for `token` if it is stored under the old hash (None if not), compiled
        into the cache under `key`. Errors: BackendUnavailable."""
        record = await self.record(token, key)
        if record is None:
            return None
        return compile_record(key, record, time.monotonic(), generation)

    async def _move(self, old: str, new: str, raw: bytes) -> None:
        """Copy the record to its new hash, point its id there, then drop the old copy. A
        change made to the old copy meanwhile (a revocation) is carried over."""
        store = self.store
        token_id = orjson.loads(raw)["id"]
        async with mapped_errors():
            await store.redis.set(store._th + new, raw, nx=True)
            await store.redis.publish(store.channel, new)  # every issued set learns it
            await store.redis.set(store._ti + token_id, new)
            last = await store.redis.getdel(store._th + old)
            if last is not None and last != raw:
                await store.redis.set(store._th + new, last)
                await store.redis.publish(store.channel, new)
            await store.redis.hdel(self._pending, token_id)
