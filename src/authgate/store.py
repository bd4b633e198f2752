"""Tokens in Redis.

Keys (each command touches one key, so every key may live on its own Cluster slot):
  {kp}:th:<hmac>    the record, JSON: the one GET the hot path makes
  {kp}:ti:<id>      <hmac> of that id's token, for management by id
  {kp}:ids          sorted set of ids by creation time, for listing
  {kp}:usage:<id>   hash: count, last_used_at (written in batches)
  {kp}:audit        capped stream of lifecycle events
  {kp}:invalidate   pub/sub channel carrying hashes to drop from caches ("*" = all)
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from . import tokens
from .backend import mapped_errors
from .config import Settings
from .errors import InvalidInput, NotFound
from .model import ATTRIBUTES, iso, public_view, status_of, validate_spec


class TokenStore:
    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        kp = settings.key_prefix
        self._th = f"{kp}:th:"
        self._ti = f"{kp}:ti:"
        self._usage = f"{kp}:usage:"
        self.ids_key = f"{kp}:ids"
        self.audit_key = f"{kp}:audit"
        self.channel = f"{kp}:invalidate"
        self._pepper = settings.pepper.reveal()

    # -- the hot path -----------------------------------------------------------------------
    def hash(self, token: str) -> str:
        return tokens.hash_token(self._pepper, token)

    async def record_by_hash(self, digest: str) -> dict[str, Any] | None:
        async with mapped_errors():
            raw = await self.redis.get(self._th + digest)
        return None if raw is None else orjson.loads(raw)

    async def records_by_hash(self, digests: list[str]) -> list[Any]:
        """Several records in one round trip: a GET each, pipelined (no multi-key command,
        so a Cluster routes each to its slot). None for an unknown hash; False for a stored
        record that is not JSON, which the caller refuses like any unreadable record."""
        if len(digests) == 1:
            async with mapped_errors():
                raws = [await self.redis.get(self._th + digests[0])]
        else:
            async with mapped_errors():
                pipe = self.redis.pipeline(transaction=False)
                for digest in digests:
                    pipe.get(self._th + digest)
                raws = await pipe.execute()
        return [None if raw is None else _loads(raw) for raw in raws]

    # -- lifecycle --------------------------------------------------------------------------
    async def create(self, spec: dict[str, Any], actor: str) -> tuple[str, dict[str, Any]]:
        """Validate, store, audit. Returns (token value shown once, public view)."""
        clean = validate_spec(spec)
        token, record = self._new_record(clean, actor)
        # Announced before it exists: every instance hears of it before anyone can use it
        # (`issued.IssuedTokens` refuses unannounced hashes without a Redis read).
        await self._publish(record["hash"])
        await self._insert(record)
        await self.audit("create", actor, record)
        await self._publish(record["hash"])
        return token, public_view(record)

    def _new_record(self, clean: dict[str, Any], actor: str) -> tuple[str, dict[str, Any]]:
        prefix = self.settings.token_prefix
        token = tokens.generate(prefix)
        now = time.time()
        record = {
            "id": tokens.new_id(now),
            "display_prefix": tokens.display_prefix(token, prefix),
            **clean,
            "environment": self.settings.environment,
            "created_at": now,
            "created_by": actor,
            "revoked_at": None,
            "hash": self.hash(token),
        }
        return token, record

    async def _insert(self, record: dict[str, Any]) -> None:
        digest = record.pop("hash")
        async with mapped_errors():
            # Record first: an id index entry never points at nothing.
            ok = await self.redis.set(self._th + digest, orjson.dumps(record), nx=True)
            if not ok:  # pragma: no cover - a 190-bit collision
                raise InvalidInput("token", "collision, try again")
            await self.redis.set(self._ti + record["id"], digest)
            await self.redis.zadd(self.ids_key, {record["id"]: record["created_at"]})
        record["hash"] = digest

    async def _load(self, token_id: str) -> dict[str, Any]:
        if not tokens.looks_like_id(token_id):
            raise NotFound(token_id)
        async with mapped_errors():
            digest = await self.redis.get(self._ti + token_id)
            raw = None if digest is None else await self.redis.get(self._th + digest.decode())
        if raw is None:
            raise NotFound(token_id)
        record: dict[str, Any] = orjson.loads(raw)
        record["hash"] = digest.decode()
        return record

    async def _save(self, record: dict[str, Any]) -> None:
        body = {k: v for k, v in record.items() if k != "hash"}
        async with mapped_errors():
            await self.redis.set(self._th + record["hash"], orjson.dumps(body), xx=True)

    async def _usage_of(self, token_id: str) -> dict[str, Any]:
        async with mapped_errors():
            raw = await self.redis.hgetall(self._usage + token_id)
        return {k.decode(): float(v) for k, v in raw.items()}

    async def show(self, token_id: str) -> dict[str, Any]:
        record = await self._load(token_id)
        return public_view(record, await self._usage_of(token_id))

    async def list_tokens(
        self,
        *,
        org: str | None = None,
        project: str | None = None,
        status: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        if status not in (None, "active", "revoked", "expired"):
            raise InvalidInput("status", "must be active, revoked or expired")
        async with mapped_errors():
            ids = [i.decode() for i in await self.redis.zrange(self.ids_key, 0, -1)]
        out: list[dict[str, Any]] = []
        now = time.time()
        for token_id in ids:
            try:
                record = await self._load(token_id)
            except NotFound:
                continue
            if org is not None and record["org"] != org:
                continue
            if project is not None and record["project"] != project:
                continue
            if status is not None and status_of(record, now) != status:
                continue
            out.append(public_view(record, await self._usage_of(token_id)))
            if len(out) >= limit:
                break
        return out

    async def revoke(self, token_id: str, actor: str) -> dict[str, Any]:
        record = await self._load(token_id)
        if record.get("revoked_at") is None:
            record["revoked_at"] = time.time()
            await self._save(record)
            await self.audit("revoke", actor, record)
            await self._publish(record["hash"])
        return public_view(record)

    async def rotate(self, token_id: str, grace: float, actor: str) -> tuple[str, dict[str, Any]]:
        """A new token with the same attributes; the old one works for `grace` seconds more."""
        if not 0 <= grace <= 30 * 86400:
            raise InvalidInput("grace", "must be between 0 and 30 days")
        old = await self._load(token_id)
        if status_of(old) != "active":
            raise InvalidInput("id", f"{token_id} is {status_of(old)} and cannot be rotated")
        clean = {k: old[k] for k in ATTRIBUTES}
        token, new = self._new_record(clean, actor)
        new["rotated_from"] = token_id
        await self._publish(new["hash"])  # announced before it exists, as in `create`
        await self._insert(new)
        now = time.time()
        old_expiry = old.get("expires_at")
        grace_end = now + grace
        old["expires_at"] = grace_end if old_expiry is None else min(old_expiry, grace_end)
        old["rotated_to"] = new["id"]
        await self._save(old)
        await self.audit("rotate", actor, old, {"new_id": new["id"], "grace_seconds": grace})
        await self._publish(old["hash"])
        await self._publish(new["hash"])
        return token, public_view(new)

    async def delete(self, token_id: str, actor: str) -> dict[str, Any]:
        record = await self._load(token_id)
        async with mapped_errors():
            # Hash key first: once it is gone the token no longer authenticates.
            await self.redis.delete(self._th + record["hash"])
            await self.redis.delete(self._ti + token_id)
            await self.redis.zrem(self.ids_key, token_id)
            await self.redis.delete(self._usage + token_id)
        await self.audit("delete", actor, record)
        await self._publish(record["hash"])
        return public_view(record)

    # -- usage ------------------------------------------------------------------------------
    async def record_usage(self, usage: dict[str, tuple[int, float]]) -> None:
        """Add request counts and last-used times gathered off the hot path."""
        if not usage:
            return
        async with mapped_errors():
            pipe = self.redis.pipeline(transaction=False)
            for token_id, (count, last) in usage.items():
                key = self._usage + token_id
                pipe.hincrby(key, "count", count)
                pipe.hset(key, "last_used_at", last)
            await pipe.execute()

    # -- audit ------------------------------------------------------------------------------
    async def audit(
        self,
        action: str,
        actor: str,
        record: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        fields = {
            "ts": f"{time.time():.3f}",
            "action": action,
            "actor": actor,
            "token_id": "" if record is None else record["id"],
            "display_prefix": "" if record is None else record.get("display_prefix", ""),
            "detail": orjson.dumps(detail or {}),
        }
        async with mapped_errors():
            await self.redis.xadd(
                self.audit_key, fields, maxlen=self.settings.audit_maxlen, approximate=True
            )

    async def audit_events(self, count: int = 50) -> list[dict[str, Any]]:
        async with mapped_errors():
            rows = await self.redis.xrevrange(self.audit_key, count=count)
        out = []
        for entry_id, fields in rows:
            f = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                {
                    "event_id": entry_id.decode(),
                    "time": _iso_from_text(f.get("ts", "0")),
                    "action": f.get("action"),
                    "actor": f.get("actor"),
                    "token_id": f.get("token_id") or None,
                    "display_prefix": f.get("display_prefix") or None,
                    "detail": orjson.loads(f.get("detail") or "{}"),
                }
            )
        return out

    async def _publish(self, digest: str) -> None:
        async with mapped_errors():
            await self.redis.publish(self.channel, digest)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False  # not None (unknown): a stored record that cannot be read


def _iso_from_text(ts: str) -> str | None:
    try:
        return iso(float(ts))
    except ValueError:
        return None
