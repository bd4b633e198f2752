"""What the console's pages ask of the management plane, in the pages' terms.

A thin layer over `manage.Manager`: it turns the service's answers into what a template
shows and its errors into `ServiceError` (status, code, message, field), so every rule —
key type, tenancy, no growth, the audit budget — stays in one place, the Manager.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import AuthgateError, InvalidInput, Refused
from ..manage import ERRORS, Caller, Manager, code_of
from ..model import EXPIRING_WITHIN, KEY_TYPES

RECENT_DAYS = 7


def _epoch(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


class ServiceError(Exception):
    """An error to show in a page: the management API's code and message."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_error(cls, exc: AuthgateError) -> ServiceError:
        code = code_of(exc)
        status, message, _ = ERRORS[code]
        name = None
        if isinstance(exc, InvalidInput):
            name, message = exc.field, f"{exc.field} {exc.message}"
        elif isinstance(exc, Refused):
            message = exc.message or message
            found = exc.details.get("field")
            name = found if isinstance(found, str) else None
        return cls(status, code, message, name)

    @classmethod
    def unavailable(cls) -> ServiceError:
        status, message, _ = ERRORS["UNAVAILABLE"]
        return cls(status, "UNAVAILABLE", message)


@dataclass(frozen=True, slots=True)
class ConsoleCaller:
    """The signed-in management token, as the pages show it."""

    caller: Caller
    can: Mapping[str, bool] = field(default_factory=dict)

    @property
    def display_prefix(self) -> str:
        return self.caller.display_prefix

    @property
    def key_type(self) -> str:
        return self.caller.key_type

    @property
    def org(self) -> str:
        return str(self.caller.record.get("org") or "")

    @property
    def project(self) -> str:
        return str(self.caller.record.get("project") or "")

    @property
    def space(self) -> str:
        return str(self.caller.record.get("space") or "")

    def need(self, flag: str) -> None:
        """ServiceError INSUFFICIENT_KEY_TYPE unless the token holds `flag` (the Manager
        checks it again on every change; this only spares a form that cannot be sent)."""
        if not self.can.get(flag):
            status, message, _ = ERRORS["INSUFFICIENT_KEY_TYPE"]
            raise ServiceError(status, "INSUFFICIENT_KEY_TYPE", message)


def _wrap(caller: Caller) -> ConsoleCaller:
    return ConsoleCaller(caller, {flag: flag in caller.key_type for flag in "rwd"})


class ConsoleApi:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.key_types = KEY_TYPES

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except AuthgateError as exc:
            raise ServiceError.from_error(exc) from None

    # -- who is signed in ---------------------------------------------------------------------
    async def sign_in(self, token: str, client_ip: str) -> ConsoleCaller:
        """The caller for a pasted management token (the value is forgotten when this
        returns: the session remembers the token's id)."""
        caller = await self._call(self.manager.authenticate([token], client_ip, "console"))
        return _wrap(caller)

    async def caller_by_id(self, token_id: str, client_ip: str) -> ConsoleCaller | None:
        """The signed-in caller again, or None when its token stopped being valid for this
        address (revoked, disabled, expired, deleted, outside its allowlist)."""
        try:
            caller = await self.manager.authenticate_id(token_id, client_ip, "console")
        except Refused:
            return None
        return _wrap(caller)

    # -- tokens -------------------------------------------------------------------------------
    async def tokens(
        self, caller: ConsoleCaller, filters: Mapping[str, str], cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        page = await self._call(self.manager.list(caller.caller, filters, cursor, limit))
        items: list[dict[str, Any]] = page["tokens"]
        # The list's own columns: requests in the last 7 days, and "expiring" for an active
        # token that expires within 7 days (as the list filter means it).
        histories = await self._call(
            self.manager.store.usage_histories([t["id"] for t in items], RECENT_DAYS)
        )
        now = time.time()
        for item, days in zip(items, histories, strict=True):
            item["requests_7d"] = sum(d["allowed"] + sum(d["denied"].values()) for d in days)
            expires = item.get("expires_at")
            if item["status"] == "active" and expires and _epoch(expires) - now <= EXPIRING_WITHIN:
                item["status"] = "expiring"
        return items, page["next_cursor"]

    async def show(self, caller: ConsoleCaller, token_id: str) -> dict[str, Any]:
        view: dict[str, Any] = await self._call(self.manager.show(caller.caller, token_id))
        return view

    async def usage(self, caller: ConsoleCaller, token_id: str, days: int) -> list[dict[str, Any]]:
        """The last `days` days, oldest first (the chart draws left to right)."""
        found = await self._call(self.manager.usage(caller.caller, token_id, days))
        history: list[dict[str, Any]] = list(reversed(found["days"]))
        return history

    async def create(
        self, caller: ConsoleCaller, spec: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        made = dict(await self._call(self.manager.create(caller.caller, spec)))
        return str(made.pop("token")), made

    async def update(
        self, caller: ConsoleCaller, token_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        view: dict[str, Any] = await self._call(self.manager.update(caller.caller, token_id, patch))
        return view

    async def rotate(
        self, caller: ConsoleCaller, token_id: str, grace: str
    ) -> tuple[str, dict[str, Any]]:
        made = dict(
            await self._call(self.manager.rotate(caller.caller, token_id, {"grace": grace}))
        )
        return str(made.pop("token")), made

    async def revoke(self, caller: ConsoleCaller, token_id: str) -> None:
        await self._call(self.manager.revoke(caller.caller, token_id))

    async def delete(self, caller: ConsoleCaller, token_id: str) -> None:
        await self._call(self.manager.delete(caller.caller, token_id))

    # -- audit --------------------------------------------------------------------------------
    async def audit(
        self, caller: ConsoleCaller, cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        page = await self._call(self.manager.audit(caller.caller, limit, before=cursor))
        return [_event(e) for e in page["events"]], page.get("next_cursor")

    async def token_audit(self, caller: ConsoleCaller, token_id: str) -> list[dict[str, Any]]:
        page = await self._call(self.manager.audit(caller.caller, 100, token_id=token_id))
        return [_event(e) for e in page["events"]]


def _event(event: Mapping[str, Any]) -> dict[str, Any]:
    detail = event.get("detail") or {}

    def show(value: Any) -> str:
        return "/".join(str(v) for v in value) if isinstance(value, list) else str(value)

    text = ", ".join(f"{k}: {show(v)}" for k, v in sorted(detail.items()))
    return {
        "time": event.get("time"),
        "event": event.get("action"),
        "actor": event.get("actor"),
        "token_id": event.get("token_id"),
        "details": text,
    }
