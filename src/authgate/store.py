"""Tokens in Redis.

Keys (each command touches one key, so every key may live on its own Cluster slot):
  {kp}:th:<hmac>          the record, JSON: the one GET the hot path makes
  {kp}:ti:<id>            <hmac> of that id's token, for management by id
  {kp}:ids                sorted set of ids by creation time: listing, newest first
  {kp}:usage:<id>         hash: count, last_used_at, last_ip (written in batches)
  {kp}:usage:<id>:<n>     hash: usage per UTC day, days 10n..10n+9 since the epoch; fields
                          `<day>:OK`, `<day>:<denial code>`, `<day>:ip`; expires 91 days
                          after its last day, so history costs nothing to trim
  {kp}:audit              capped stream of lifecycle events
  {kp}:invalidate         pub/sub channel carrying hashes to drop from caches ("*" = all)

A record changes by compare-and-set on its one key (a short Lua script), so a PATCH racing
a revocation can never bring the revoked token back. This layer does not ask who is
calling: the CLI uses it as the environment's owner, the management API through
`manage.Manager`, which does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from . import tokens
from .backend import mapped_errors
from .config import Settings
from .errors import InvalidInput, NotFound
from .model import ATTRIBUTES, iso, public_view, status_of, validate_spec
from .usage import as_usage

DAY = 86400
BUCKET_DAYS = 10
HISTORY_DAYS = 90
MAX_GRACE = 30 * 86400.0
SCAN_BATCH = 200  # ids read per round trip while listing
AUDIT_SCAN = 5000  # audit events read at most for one page
_SCOPE_FIELDS = ("org", "project", "space")
# Set `KEYS[1]` to ARGV[2] only if it still holds ARGV[1]: 1 when it did, else 0.
_CAS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_CAS_TRIES = 8

Position = tuple[float, str]  # (creation time, id) of the last token a page walked past


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

    async def record_by_token(self, token: str) -> dict[str, Any] | None:
        """The record of `token`, also under AUTHGATE_PEPPER_PREVIOUS while one is set."""
        digest = self.hash(token)
        record = await self.record_by_hash(digest)
        if record is None and self.settings.pepper_previous is not None:
            from .pepper import PreviousPepper

            record = await PreviousPepper(self.settings, self).record(token, bytes.fromhex(digest))
        return record

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
        return await self.add(validate_spec(spec), actor)

    async def add(self, clean: dict[str, Any], actor: str) -> tuple[str, dict[str, Any]]:
        """Store a token with attributes `validate_spec` returned, audit, publish."""
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
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self._ti + record["id"], digest)
            pipe.zadd(self.ids_key, {record["id"]: record["created_at"]})
            await pipe.execute()
        record["hash"] = digest

    async def load(self, token_id: str) -> dict[str, Any]:
        """The record of `token_id` (with its `hash`), or NotFound."""
        record, _ = await self._load_raw(token_id)
        return record

    _load = load  # the name `explain` knows

    async def _load_raw(self, token_id: str) -> tuple[dict[str, Any], bytes]:
        if not tokens.looks_like_id(token_id):
            raise NotFound(token_id)
        async with mapped_errors():
            digest = await self.redis.get(self._ti + token_id)
            raw = None if digest is None else await self.redis.get(self._th + digest.decode())
        if raw is None or digest is None:
            raise NotFound(token_id)
        record: dict[str, Any] = orjson.loads(raw)
        record["hash"] = digest.decode()
        return record, raw

    async def load_many(self, token_ids: list[str]) -> list[dict[str, Any] | None]:
        """Records of several ids in two round trips; None where an id is gone."""
        if not token_ids:
            return []
        async with mapped_errors():
            pipe = self.redis.pipeline(transaction=False)
            for token_id in token_ids:
                pipe.get(self._ti + token_id)
            digests = await pipe.execute()
            pipe = self.redis.pipeline(transaction=False)
            for digest in digests:
                if digest is not None:
                    pipe.get(self._th + digest.decode())
            raws = iter(await pipe.execute())
        out: list[dict[str, Any] | None] = []
        for digest in digests:
            raw = None if digest is None else next(raws)
            record = None if raw is None else _loads(raw)
            if isinstance(record, dict):
                record["hash"] = digest.decode()
                out.append(record)
            else:
                out.append(None)
        return out

    async def _modify(
        self, token_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Apply `change` to the stored record atomically: (record before, record after, or
        None when `change` found nothing to do). `change` gets a copy and may raise; it is
        run again if the record changed in the meantime."""
        for _ in range(_CAS_TRIES):
            before, raw = await self._load_raw(token_id)
            after = change(dict(before))
            if after is None:
                return before, None
            body = orjson.dumps({k: v for k, v in after.items() if k != "hash"})
            async with mapped_errors():
                done = await self.redis.eval(_CAS, 1, self._th + before["hash"], raw, body)
            if done:
                after["hash"] = before["hash"]
                return before, after
        raise InvalidInput("id", f"{token_id} is changing too often; try again")

    async def _usage_of(self, token_id: str) -> dict[str, Any]:
        async with mapped_errors():
            raw = await self.redis.hgetall(self._usage + token_id)
        return _usage_fields(raw)

    async def usage_of_many(self, token_ids: list[str]) -> list[dict[str, Any]]:
        if not token_ids:
            return []
        async with mapped_errors():
            pipe = self.redis.pipeline(transaction=False)
            for token_id in token_ids:
                pipe.hgetall(self._usage + token_id)
            rows = await pipe.execute()
        return [_usage_fields(raw) for raw in rows]

    async def view(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return public_view(record, await self._usage_of(record["id"]))

    async def show(self, token_id: str) -> dict[str, Any]:
        return await self.view(await self.load(token_id))

    async def page(
        self,
        *,
        after: Position | None,
        limit: int,
        keep: Callable[[dict[str, Any]], bool],
        scan_most: int = 5000,
    ) -> tuple[list[dict[str, Any]], Position | None]:
        """Tokens newest first, older than `after`, that `keep` accepts: (public views, the
        position to go on from, or None at the end). The position is a token's (creation
        time, id), not an offset, so tokens created or deleted meanwhile shift nothing: a
        walk sees every token that exists throughout it exactly once. At most `scan_most`
        ids are looked at per call; a page may then hold fewer than `limit` and go on."""
        out: list[tuple[dict[str, Any], Position]] = []
        position = after
        scanned = 0
        while len(out) < limit and scanned < scan_most:
            want = min(SCAN_BATCH, scan_most - scanned)
            rows = await self._ids_after(position, want)
            if not rows:
                position = None
                break
            records = await self.load_many([token_id for token_id, _ in rows])
            for (token_id, score), record in zip(rows, records, strict=True):
                scanned += 1
                position = (score, token_id)
                if record is not None and keep(record) and len(out) < limit:
                    out.append((record, position))
            if len(rows) < want and len(out) < limit:
                position = None
                break
        if len(out) >= limit:
            position = out[-1][1]
        usage = await self.usage_of_many([r["id"] for r, _ in out])
        views = [public_view(r, u) for (r, _), u in zip(out, usage, strict=True)]
        return views, position

    async def _ids_after(self, position: Position | None, count: int) -> list[tuple[str, float]]:
        """Up to `count` (id, score), newest first, after `position`."""
        key = self.ids_key
        async with mapped_errors():
            if position is None:
                rows = await self.redis.zrevrangebyscore(
                    key, "+inf", "-inf", start=0, num=count, withscores=True
                )
                return [(m.decode(), float(s)) for m, s in rows]
            score, last = position
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrevrangebyscore(key, repr(score), repr(score), withscores=True)
            pipe.zrevrangebyscore(key, f"({score!r}", "-inf", start=0, num=count, withscores=True)
            tied, rest = await pipe.execute()
        # Equal scores come in reverse order of their ids: the rest of the tie comes first.
        out = [(m.decode(), float(s)) for m, s in tied if m.decode() < last]
        out.extend((m.decode(), float(s)) for m, s in rest)
        return out[:count]

    async def revoke(self, token_id: str, actor: str) -> dict[str, Any]:
        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            if record.get("revoked_at") is not None:
                return None
            record["revoked_at"] = time.time()
            return record

        before, after = await self._modify(token_id, change)
        if after is None:
            return public_view(before)
        await self.audit("revoke", actor, after)
        await self._publish(after["hash"])
        return public_view(after)

    async def update(
        self,
        token_id: str,
        changes: Mapping[str, Any],
        actor: str,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Change patchable attributes (`model.validate_patch` output). `check(new record)`
        may refuse the result by raising; nothing is written then. A revoked token cannot
        change. Audited with the names of the fields that changed; every instance drops
        the token from its cache."""
        changed: list[str] = []

        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            if record.get("revoked_at") is not None:
                raise InvalidInput("id", f"{token_id} is revoked and cannot change")
            changed.clear()
            for name, value in changes.items():
                if record.get(name, True if name == "enabled" else None) != value:
                    record[name] = value
                    changed.append(name)
            if check is not None:
                check(record)
            if not changed:
                return None
            record["updated_at"] = time.time()
            record["updated_by"] = actor
            return record

        before, after = await self._modify(token_id, change)
        if after is None:
            return await self.view(before)
        await self.audit("update", actor, after, {"fields": sorted(changed)})
        await self._publish(after["hash"])
        return await self.view(after)

    async def rotate(
        self,
        token_id: str,
        grace: float,
        actor: str,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """A new token with the same attributes; the old one works for `grace` seconds more.
        `check(old record)` may refuse the rotation by raising."""
        if not 0 <= grace <= MAX_GRACE:
            raise InvalidInput("grace", "must be between 0 and 30 days")
        old = await self.load(token_id)
        if status_of(old) not in ("active", "disabled") or old.get("rotated_to"):
            state = "rotated" if old.get("rotated_to") else status_of(old)
            raise InvalidInput("id", f"{token_id} is {state} and cannot be rotated")
        if check is not None:
            check(old)
        clean = {k: old[k] for k in ATTRIBUTES}
        if old.get("enabled", True) is False:
            clean["enabled"] = False
        token, new = self._new_record(clean, actor)
        new["rotated_from"] = token_id
        await self._publish(new["hash"])  # announced before it exists, as in `create`
        await self._insert(new)

        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            if status_of(record) not in ("active", "disabled") or record.get("rotated_to"):
                raise InvalidInput("id", f"{token_id} changed while rotating; try again")
            now = time.time()
            expiry = record.get("expires_at")
            record["expires_at"] = now + grace if expiry is None else min(expiry, now + grace)
            record["rotated_to"] = new["id"]
            return record

        try:
            _, after = await self._modify(token_id, change)
        except Exception:
            await self._remove(new)  # the old token stays as it was
            raise
        assert after is not None
        await self.audit("rotate", actor, after, {"new_id": new["id"], "grace_seconds": grace})
        await self._publish(after["hash"])
        await self._publish(new["hash"])
        return token, public_view(new)

    async def delete(self, token_id: str, actor: str) -> dict[str, Any]:
        record = await self.load(token_id)
        await self._remove(record)
        await self.audit("delete", actor, record)
        await self._publish(record["hash"])
        return public_view(record)

    async def _remove(self, record: Mapping[str, Any]) -> None:
        token_id = record["id"]
        async with mapped_errors():
            # Hash key first: once it is gone the token no longer authenticates.
            await self.redis.delete(self._th + record["hash"])
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self._ti + token_id)
            pipe.zrem(self.ids_key, token_id)
            pipe.delete(self._usage + token_id)
            today = int(time.time() // DAY)
            for bucket in range((today - HISTORY_DAYS) // BUCKET_DAYS, today // BUCKET_DAYS + 1):
                pipe.delete(f"{self._usage}{token_id}:{bucket}")
            await pipe.execute()

    # -- usage ------------------------------------------------------------------------------
    async def record_usage(self, usage: Mapping[str, Any]) -> None:
        """Add usage gathered off the hot path (`usage.Usage` per token id): the totals, and
        today's row of the per-day history."""
        if not usage:
            return
        now = time.time()
        today = int(now // DAY)
        bucket = today // BUCKET_DAYS
        expire_at = ((bucket + 1) * BUCKET_DAYS + HISTORY_DAYS + 1) * DAY
        async with mapped_errors():
            pipe = self.redis.pipeline(transaction=False)
            for token_id, item in usage.items():
                u = as_usage(item)
                key = self._usage + token_id
                day = f"{self._usage}{token_id}:{bucket}"
                if u.allowed:
                    pipe.hincrby(key, "count", u.allowed)
                    pipe.hset(key, "last_used_at", u.last_used)
                    pipe.hincrby(day, f"{today}:OK", u.allowed)
                for code, n in u.denied.items():
                    pipe.hincrby(day, f"{today}:{code}", n)
                if u.address is not None:
                    pipe.hset(key, "last_ip", u.address)
                    pipe.hset(day, f"{today}:ip", u.address)
                if u.allowed or u.denied or u.address is not None:
                    pipe.expireat(day, expire_at)
            await pipe.execute()

    async def usage_history(self, token_id: str, days: int) -> list[dict[str, Any]]:
        """The last `days` UTC days, newest first: date, allowed, denied by code, last
        client address (days without traffic included, with zeros)."""
        return (await self.usage_histories([token_id], days))[0]

    async def usage_histories(
        self, token_ids: Sequence[str], days: int
    ) -> list[list[dict[str, Any]]]:
        """`usage_history` for several tokens in one round trip."""
        today = int(time.time() // DAY)
        first = today - days + 1
        buckets = list(range(first // BUCKET_DAYS, today // BUCKET_DAYS + 1))
        async with mapped_errors():
            pipe = self.redis.pipeline(transaction=False)
            for token_id in token_ids:
                for bucket in buckets:
                    pipe.hgetall(f"{self._usage}{token_id}:{bucket}")
            rows = await pipe.execute()
        histories = []
        for n in range(len(token_ids)):
            fields: dict[str, str] = {}
            for row in rows[n * len(buckets) : (n + 1) * len(buckets)]:
                fields.update({k.decode(): v.decode() for k, v in row.items()})
            histories.append(_days(fields, today, first))
        return histories

    # -- audit ------------------------------------------------------------------------------
    async def audit(
        self,
        action: str,
        actor: str,
        record: Mapping[str, Any] | None = None,
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
        if record is not None and "org" in record:
            # Where the token lives, so a scoped reader of the audit sees its tenant's events.
            fields["scope"] = orjson.dumps({k: record.get(k) or "" for k in _SCOPE_FIELDS})
        async with mapped_errors():
            await self.redis.xadd(
                self.audit_key, fields, maxlen=self.settings.audit_maxlen, approximate=True
            )

    async def audit_events(self, count: int = 50) -> list[dict[str, Any]]:
        events, _ = await self.audit_page(count, None, lambda _event: True)
        return events

    async def audit_page(
        self,
        count: int,
        before: str | None,
        keep: Callable[[Mapping[str, Any]], bool],
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to `count` events that `keep`, newest first, older than the event id `before`;
        and the id to continue from (None at the end). Reads at most AUDIT_SCAN events a call,
        so a reader whose events are rare gets a short page and a cursor, not a long stall."""
        out: list[dict[str, Any]] = []
        top = "+" if before is None else "(" + before
        scanned = 0
        last: str | None = None
        while len(out) < count and scanned < AUDIT_SCAN:
            async with mapped_errors():
                rows = await self.redis.xrevrange(self.audit_key, max=top, count=200)
            if not rows:
                return out, None
            for entry_id, fields in rows:
                scanned += 1
                last = entry_id.decode()
                event = _event(last, fields)
                if keep(event):
                    out.append(event)
                    if len(out) == count:
                        break
            top = "(" + (last or "")
            if len(rows) < 200 and len(out) < count:
                return out, None
        return out, last

    async def _publish(self, digest: str) -> None:
        async with mapped_errors():
            await self.redis.publish(self.channel, digest)


def _usage_fields(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode()
        out[name] = v.decode() if name == "last_ip" else float(v)
    return out


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


def _event(entry_id: str, raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return {
        "event_id": entry_id,
        "time": _iso_from_text(f.get("ts", "0")),
        "action": f.get("action"),
        "actor": f.get("actor"),
        "token_id": f.get("token_id") or None,
        "display_prefix": f.get("display_prefix") or None,
        "scope": orjson.loads(f["scope"]) if f.get("scope") else None,
        "detail": orjson.loads(f.get("detail") or "{}"),
    }


def _days(fields: Mapping[str, str], today: int, first: int) -> list[dict[str, Any]]:
    out = []
    for day in range(today, first - 1, -1):
        denied: dict[str, int] = {}
        prefix = f"{day}:"
        for name, value in fields.items():
            if name.startswith(prefix):
                what = name[len(prefix) :]
                if what not in ("OK", "ip"):
                    denied[what] = int(value)
        out.append(
            {
                "date": time.strftime("%Y-%m-%d", time.gmtime(day * DAY)),
                "allowed": int(fields.get(f"{day}:OK", 0)),
                "denied": dict(sorted(denied.items())),
                "last_client_ip": fields.get(f"{day}:ip"),
            }
        )
    return out
