"""`authgate explain`: the decision `/auth` would make, and which check made it."""

from __future__ import annotations

import ipaddress
from typing import Any

from .authorizer import Authorizer
from .cache import TokenCache
from .metrics import Metrics
from .model import Entry
from .plane import AuthRequest, BadRequest, Decision
from .reading import RequestReader
from .store import TokenStore
from .usage import UsageRecorder

CHECKS = {
    0: "all checks passed",
    1: "check 1: no token in any source",
    2: "check 2: mode 'both' needs every source",
    3: "check 3: sources disagree",
    4: "check 4: malformed token (prefix, charset, length or checksum)",
    5: "check 5: unknown, deleted, revoked, management-only or other environment",
    6: "check 6: expired",
    7: "check 7: client IP outside the allowlist",
    8: "check 8: org/project/app differs from the token's",
    9: "check 9: key type lacks the method's flag",
    10: "check 10: System API without role admin",
    11: "check 11: route permission scopes missing",
    12: "check 12: Redis unreachable",
}


async def explain(
    store: TokenStore,
    *,
    method: str,
    uri: str,
    token: str | None,
    token_id: str | None,
    ip: str | None,
) -> dict[str, Any]:
    settings = store.settings
    cache = TokenCache(ttl=0, stale_window=0, negative_ttl=0, size=1, negative_size=1)
    authorizer = Authorizer(settings, store, cache, Metrics(), UsageRecorder())
    reader = RequestReader(settings, authorizer.routes)
    try:  # read as the plain nginx dialect reads X-Original-URI
        path, query, _ = reader.target(uri, raw=False)
        apps = reader.query.read(query, None)[0] if query else []
    except BadRequest as exc:
        return {
            "status": 400,
            "code": "BAD_REQUEST",
            "reason": f"the URI: {exc.reason}",
            "details": {},
        }
    client_ip = ipaddress.ip_address(ip) if ip else None
    req = AuthRequest(method.upper(), path, query, client_ip, {}, False, apps)
    found = authorizer.routes.lookup(path)
    route = found.route
    decision: Decision
    if token is not None:
        req.candidates = {s.label: [token] for s in settings.token_sources}
        decision = await authorizer.decide(req)
    else:
        assert token_id is not None
        record = await store._load(token_id)
        decision = authorizer.authorize(Entry.from_record(record), req, __import__("time").time())
    entry = decision.entry
    return {
        "status": decision.status,
        "code": decision.code,
        "reason": "check 6b: disabled"
        if decision.code == "TOKEN_DISABLED"
        else CHECKS[decision.check],
        "check": decision.check,
        "details": decision.details,
        "token_id": entry.id if entry else token_id,
        "route": f"{route.cls} {route.prefix}"
        if route
        else "none, inside a protected area"
        if found.area
        else "default (no route matched)",
        "path": path,
        "client_ip": ip,
    }
