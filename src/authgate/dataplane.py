"""The data plane: `/auth` and `/ext-authz/…`, read top to bottom.

A request is read (`reading`: dialect, method, normalised path, query, client IP, token
candidates), decided (`authorizer`: the SPEC §2 checks in order, the first failing one
answers) and encoded (`wire`). Nothing here raises to the server: every outcome is a
decision.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .authorizer import Authorizer
from .config import Settings
from .plane import Answer, AuthRequest, BadRequest, Decision, Receive, Scope, Send, deny, log
from .reading import RequestReader, is_nginx
from .wire import AnswerWriter, json_answer


class DataPlane:
    """The raw ASGI app on AUTHGATE_LISTEN: no framework between request and decision."""

    def __init__(
        self, settings: Settings, authorizer: Authorizer, ready: Callable[[], Awaitable[bool]]
    ) -> None:
        self.settings = settings
        self.authorizer = authorizer
        self.metrics = authorizer.metrics
        self.ready = ready
        self.reader = RequestReader(settings, authorizer.routes)
        self.writer = AnswerWriter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        answer = self.answer_now(scope)
        if not isinstance(answer, tuple):
            answer = await answer
        status, headers, body = answer
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def answer_now(self, scope: Scope) -> Answer | Coroutine[Any, Any, Answer]:
        """The answer to one request: (status, headers, body) when it is known without
        waiting (a cache hit, a denial, /healthz), else a coroutine that makes it (a cache
        miss, /readyz). `scope` needs the ASGI keys path, raw_path, query_string, method,
        headers (lower-case names) and client. The ASGI entry above and the data-plane
        HTTP server (`fasthttp`) both answer through this; every header list carries
        Content-Length."""
        path: str = scope["path"]
        if path == "/auth" or path.startswith("/ext-authz/") or path == "/ext-authz":
            started = time.perf_counter()
            req: AuthRequest | None = None
            try:
                req = self.reader.read(scope)
                decision = self.authorizer.decide_cached(req)
                if decision is None:
                    return self._auth_later(scope, req, started)
            except BadRequest as exc:
                decision = deny("BAD_REQUEST", 0, reason=exc.reason)
            except Exception as exc:  # every outcome must be a decision, never a 500 to nginx
                log.error("unexpected %s while deciding; answering UNAVAILABLE", type(exc).__name__)
                decision = deny("UNAVAILABLE", 12)
            return self.auth_answer(scope, req, decision, started)
        if path == "/healthz":
            return json_answer(200, b'{"status":"ok"}')
        if path == "/readyz":
            return self._readyz()
        return json_answer(
            404, b'{"error":{"code":"NOT_FOUND","message":"No such endpoint.","details":{}}}'
        )

    async def _readyz(self) -> Answer:
        ok = await self.ready()
        return json_answer(
            200 if ok else 503, b'{"status":"ready"}' if ok else b'{"status":"redis unavailable"}'
        )

    async def _auth_later(self, scope: Scope, req: AuthRequest, started: float) -> Answer:
        try:
            decision = await self.authorizer.decide(req)
        except Exception as exc:  # every outcome must be a decision, never a 500 to nginx
            log.error("unexpected %s while deciding; answering UNAVAILABLE", type(exc).__name__)
            decision = deny("UNAVAILABLE", 12)
        return self.auth_answer(scope, req, decision, started)

    def auth_answer(
        self, scope: Scope, req: AuthRequest | None, decision: Decision, started: float
    ) -> Answer:
        """The response for a decision (counted in the metrics)."""
        entry = decision.entry
        answer: Answer
        if decision.status == 200 and req is not None and entry is not None:
            uri, query, encoded = self.reader.forwarded(req)
            answer = self.writer.allowed(entry, uri, query, encoded)
        else:
            answer = self.writer.denied(decision, req.fold if req is not None else is_nginx(scope))
        self.metrics.decided(decision.code, time.perf_counter() - started)
        return answer
