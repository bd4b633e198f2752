"""The decision: SPEC §2's checks, in order, for a request already read.

`Authorizer.decide_cached` makes the whole decision without an await when the cache can
answer; `decide` adds the Redis lookup for everything else. `RouteTable` says which route
a normalised path falls under and what it binds. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

from .backend import LOOKUP_CONNECTIONS, lookup_call
from .cache import TokenCache
from .config import Route, Settings
from .decisions import METHOD_FLAG
from .errors import BackendUnavailable
from .issued import IssuedTokens
from .metrics import Metrics
from .model import Entry, ip_allowed, iso
from .pepper import PreviousPepper
from .plane import AuthRequest, Decision, deny, log
from .store import TokenStore
from .tokens import Hasher, is_well_formed
from .usage import UsageRecorder


class Authorizer:
    """Decides one request. Holds the cache; asks the store only on a miss.

    `decide_cached` is the hot path: when the cache can answer, the whole decision is made
    without a single await. `decide` adds the Redis lookup for everything else.
    """

    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        cache: TokenCache,
        metrics: Metrics,
        usage: UsageRecorder,
        issued: IssuedTokens | None = None,
    ) -> None:
        self.settings = settings
        self.issued = issued  # None: every unknown token is asked of Redis
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.usage = usage
        self.sources = settings.token_sources
        self.prefix = settings.token_prefix
        self.environment = settings.environment
        self.max_token = settings.max_token_length
        self.routes = RouteTable(settings.routes)
        self._both = settings.token_mode == "both"
        self._hash = Hasher(settings.pepper.reveal()).digest
        self.previous = PreviousPepper.of(settings, store)  # only while rotating the pepper
        self._cache_counts = metrics.cache_counts
        # Cache misses: one Redis GET per token however many requests carry it at once, and
        # one round trip for all the misses of an event-loop turn.
        self._loading: dict[bytes, asyncio.Future[Entry | BackendUnavailable | None]] = {}
        self._queued: list[bytes] = []
        self._reads: set[asyncio.Future[None]] = set()
        self._timeout = settings.redis_timeout

    # -- checks 1-4: the token itself --------------------------------------------------------
    def pick_token(self, req: AuthRequest) -> str | Decision:
        found = self.candidate(req)
        if isinstance(found, str) and not is_well_formed(found, self.prefix):
            return deny("TOKEN_INVALID", 4)
        return found

    def candidate(self, req: AuthRequest) -> str | Decision:
        """Checks 1-3 and check 4's length limit; the rest of check 4 is `is_well_formed`."""
        candidates = req.candidates
        present = 0
        for values in candidates.values():
            if values:
                present += 1
        if not present:
            return deny("TOKEN_MISSING", 1, sources=[s.label for s in self.sources])
        if self._both and present < len(self.sources):
            missing = [s.label for s in self.sources if not candidates.get(s.label)]
            return deny("TOKEN_MISSING", 2, missing=missing)
        token: str | None = None
        for values in candidates.values():
            for value in values:
                if token is None:
                    token = value
                elif value != token:
                    labels = sorted(label for label, v in candidates.items() if v)
                    return deny("TOKEN_MISMATCH", 3, sources=labels)
        if token is None or len(token) > self.max_token:
            return deny("TOKEN_INVALID", 4)
        return token

    # -- check 5: find it ---------------------------------------------------------------------
    async def lookup(self, token: str) -> Entry | Decision | None:
        """The token's entry (None when unknown), from the cache or one Redis GET."""
        key = self._hash(token)
        now = time.monotonic()
        state, entry = self.cache.get(key, now)
        if state == "miss" and self.issued is not None and self._never_issued(token, key):
            await self.issued.settle()
            if self._never_issued(token, key) and self.issued.quiet():
                self._cache_counts["unissued"] += 1
                return None  # never issued: no Redis read
        self._cache_counts[state] += 1
        if state == "fresh":
            return entry
        if state == "negative":
            return None
        loaded = await self._load(key)
        if loaded is None and self.previous is not None:
            try:
                loaded = await self.previous.load(token, key, self._compile, self.cache.generation)
            except BackendUnavailable as exc:
                loaded = exc
        if isinstance(loaded, BackendUnavailable):
            if state == "stale":
                return entry  # bounded by stale_window; invalidations still drop it
            log.warning("redis unavailable on lookup (%s)", loaded.reason)
            self.metrics.unavailable(loaded.reason)
            return deny("UNAVAILABLE", 12)
        return loaded

    def _never_issued(self, token: str, key: bytes) -> bool:
        """Whether the issued set rules this token out: its hash was never issued, nor,
        while the pepper is being rotated, its hash under the previous pepper."""
        issued = self.issued
        if issued is None or issued.may_hold(key):
            return False
        return self.previous is None or not issued.may_hold(self.previous.digest(token))

    async def _load(self, key: bytes) -> Entry | BackendUnavailable | None:
        """The token's record, from the next batched read: the misses of one event-loop
        turn share one Redis round trip, and a token already being read is not read again."""
        future = self._loading.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._loading[key] = loop.create_future()
            self._queued.append(key)
            if len(self._queued) == 1:
                loop.call_soon(self._start_read)
        return await asyncio.shield(future)

    def _start_read(self) -> None:
        """Read what is queued, unless LOOKUP_CONNECTIONS reads are in flight: then the
        queue waits for the first of them to finish and goes out as one batch (a slow
        Redis makes misses wait, it never runs the lookup client out of connections)."""
        if not self._queued or len(self._reads) >= LOOKUP_CONNECTIONS:
            return
        keys, self._queued = self._queued, []
        task = asyncio.ensure_future(self._read(keys))
        self._reads.add(task)  # a reference until it is done
        task.add_done_callback(self._read_done)

    def _read_done(self, task: asyncio.Future[None]) -> None:
        self._reads.discard(task)
        self._start_read()

    async def _read(self, keys: list[bytes]) -> None:
        generation = self.cache.generation
        now = time.monotonic()
        started = time.perf_counter()
        results: list[Entry | BackendUnavailable | None] = []
        digests = [k.hex() for k in keys]
        try:
            records = await lookup_call(lambda: self.store.records_by_hash(digests), self._timeout)
        except BackendUnavailable as exc:
            self.metrics.redis_failed()
            results = [exc] * len(keys)
        else:
            self.metrics.redis_call(time.perf_counter() - started)
            for key, record in zip(keys, records, strict=True):
                results.append(self._compile(key, record, now, generation))
        finally:
            lost = BackendUnavailable("lookup did not finish")
            for i, key in enumerate(keys):
                future = self._loading.pop(key)
                if not future.done():
                    future.set_result(results[i] if i < len(results) else lost)

    def _compile(
        self, key: bytes, record: Any, now: float, generation: int
    ) -> Entry | BackendUnavailable | None:
        if record is None:
            self.cache.put_negative(key, now, generation)
            return None
        try:
            entry = Entry.from_record(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("token record %s… is malformed (%s)", key.hex()[:12], type(exc).__name__)
            return BackendUnavailable("malformed token record", "malformed")
        self.cache.put(key, entry, now, generation)
        return entry

    # -- checks 6-11: what this token may do here --------------------------------------------
    def authorize(self, entry: Entry, req: AuthRequest, now: float) -> Decision:
        if entry.revoked or entry.kind != "query" or entry.environment != self.environment:
            return deny("TOKEN_INVALID", 5)
        if entry.expires_at is not None and entry.expires_at <= now:
            return deny("TOKEN_EXPIRED", 6, expired_at=iso(entry.expires_at))
        if not entry.enabled:
            return deny("TOKEN_DISABLED", 6)  # check 6b
        if entry.networks and not ip_allowed(entry.networks, req.client_ip):
            return deny("IP_NOT_ALLOWED", 7, client_ip=str(req.client_ip or "unknown"))
        found = self.routes.lookup(req.path)
        route = found.route
        if route is not None:
            scope = self.check_scope(entry, route, found.bound, req)
            if scope is not None:
                return scope
        elif found.area:
            return deny("SCOPE_MISMATCH", 8, reason="no route binds this path in its area")
        flag = METHOD_FLAG.get(req.method)
        if flag is None or flag not in entry.key_type:
            return deny("INSUFFICIENT_KEY_TYPE", 9, required=flag, method=req.method[:16])
        if route is not None and route.cls == "system" and "admin" not in entry.roles:
            return deny("ADMIN_REQUIRED", 10)
        if route is not None and not route.permissions <= entry.permissions:
            return deny(
                "INSUFFICIENT_PERMISSIONS",
                11,
                required=sorted(route.permissions - entry.permissions),
            )
        return Decision(200, "OK", 0, entry=entry)

    def check_scope(
        self, entry: Entry, route: Route, bound: dict[str, str], req: AuthRequest
    ) -> Decision | None:
        if "org" in bound and (bound["org"] != entry.org or bound["project"] != entry.project):
            return deny("SCOPE_MISMATCH", 8)
        if route.cls == "app" and entry.app_ids:
            apps = list(req.app_ids)
            if "app" in bound:
                apps.append(bound["app"])
            if not apps or any(a not in entry.app_ids for a in apps):
                return deny("SCOPE_MISMATCH", 8)
        return None

    def decide_cached(self, req: AuthRequest) -> Decision | None:
        """The decision when no Redis call is needed (the token is missing, malformed, known
        unknown, or found fresh in the cache), else None. A cache hit skips check 4's
        checksum: only tokens that passed it are ever cached, and the key is their HMAC."""
        token = self.candidate(req)
        if isinstance(token, Decision):
            return token
        key = self._hash(token)
        now = time.monotonic()
        entry = self.cache.fresh(key, now)
        if entry is None:
            if not is_well_formed(token, self.prefix):
                return deny("TOKEN_INVALID", 4)
            if self.cache.known_unknown(key, now):
                self._cache_counts["negative"] += 1
                return deny("TOKEN_INVALID", 5)
            if self.issued is not None and self._never_issued(token, key):
                if self.issued.quiet():  # a forged token: no Redis read
                    self._cache_counts["unissued"] += 1
                    return deny("TOKEN_INVALID", 5)
                return None  # an announcement may be waiting: `lookup` lets it be applied
            return None
        self._cache_counts["fresh"] += 1
        decision = self.authorize(entry, req, time.time())
        if decision.status == 200:
            self.usage.note(entry.id, req.client_ip)
        elif decision.check >= 6:  # checks 6-11: a denial of this token, in its usage
            self.usage.refused(entry.id, decision.code, req.client_ip)
        return decision

    async def decide(self, req: AuthRequest) -> Decision:
        picked = self.pick_token(req)
        if isinstance(picked, Decision):
            return picked
        found = await self.lookup(picked)
        if isinstance(found, Decision):
            return found
        if found is None:
            return deny("TOKEN_INVALID", 5)
        decision = self.authorize(found, req, time.time())
        if decision.allowed:
            self.usage.note(found.id, req.client_ip)
        elif decision.check >= 6:
            self.usage.refused(found.id, decision.code, req.client_ip)
        return decision


@dataclass(frozen=True, slots=True)
class Match:
    """Where a normalised path falls: the first route it matches and what that bound;
    `area`: no route, but inside a protected area (SCOPE_MISMATCH); `case_variant`: a
    route or area before it would match if letter case were ignored."""

    route: Route | None
    bound: dict[str, str]  # read-only
    area: bool = False
    case_variant: bool = False


_NO_MATCH = Match(None, {})


class RouteTable:
    """`Settings.routes` compiled: one anchored regex per route, tried in order, then the
    protected areas of scoped and app routes (`Route.area`)."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        # (route, or None for an area; literal head; its casefold; exact and case-blind regex)
        self._routes: list[tuple[Route | None, str, str, re.Pattern[str], re.Pattern[str]]] = []
        for route in routes:
            pattern, head, bound = "", "", False
            for segment in route.segments:
                if segment[0] == "{":  # org, project or app, each at most once
                    pattern += f"/(?P<{segment[1:-1]}>[^/]+)"
                    bound = True
                else:
                    pattern += "/" + re.escape(segment)
                    if not bound:
                        head += "/" + segment
            # Whole segments: the prefix ends the path or a slash follows (\Z, not $: a
            # decoded %0A must not end a segment early).
            self._add(route, head, pattern + r"(?:/|\Z)")
        for route in routes:
            if route.area is not None:
                self._add(None, route.area, re.escape(route.area) + r"(?:/|\Z)")
        self._longest = max((len(entry[2]) for entry in self._routes), default=0)
        self._seen: dict[str, Match] = {}
        self._last: tuple[str | None, Match] = (None, _NO_MATCH)
        # With every prefix in lower case, an ASCII path without capitals cannot match one
        # only when case is ignored: no case-blind pass then.
        spelled = [r.prefix for r in routes] + [r.area for r in routes if r.area is not None]
        self._lower = all(p == p.lower() for p in spelled)

    def _add(self, route: Route | None, head: str, pattern: str) -> None:
        exact = re.compile(pattern)
        blind = re.compile(pattern, re.IGNORECASE)
        self._routes.append((route, head, head.casefold(), exact, blind))

    def match(self, path: str) -> tuple[Route | None, dict[str, str]]:
        """The first route whose prefix `path` starts with, and the placeholders it bound.
        Treat the dict as read-only."""
        found = self.lookup(path)
        return found.route, found.bound

    def lookup(self, path: str) -> Match:
        """Where `path` falls; remembered for recent (short) paths, and for the last long
        one (a request's reading and its decision look up the same path)."""
        if len(path) > 512:  # not hashed: that alone costs a pass over it
            last, match = self._last
            if last is not path:
                match = self._lookup(path)
                self._last = (path, match)
            return match
        found = self._seen.get(path)
        if found is None:
            found = self._lookup(path)
            if len(self._seen) >= 4096:
                self._seen.clear()
            self._seen[path] = found
        return found

    def _lookup(self, path: str) -> Match:
        if self._lower and path.isascii() and path == path.lower():
            for route, head, _, exact, _ in self._routes:
                if path.startswith(head):
                    m = exact.match(path)
                    if m is not None:
                        return Match(route, m.groupdict()) if route else Match(None, {}, True)
            return _NO_MATCH
        view = path
        if not path.isascii():  # as a Unicode-aware upstream reads it (long s is s)
            try:
                view = path.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                pass
        # Only compared with the heads: casefold maps each character to one or more, so
        # the head's length of the view is enough.
        folded = view[: self._longest].casefold()
        variant = False
        for route, head, head_folded, exact, blind in self._routes:
            if path.startswith(head):
                m = exact.match(path)
                if m is not None:
                    if route is None:
                        return Match(None, {}, True, variant)
                    return Match(route, m.groupdict(), False, variant)
            if not variant and (folded.startswith(head_folded) or not view.isascii()):
                variant = blind.match(view) is not None
        return Match(None, {}, False, True) if variant else _NO_MATCH


def match_route(routes: tuple[Route, ...], path: str) -> tuple[Route | None, dict[str, str]]:
    return RouteTable(routes).match(path)
