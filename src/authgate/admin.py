"""The management API (placeholder until the management API lands)."""

from __future__ import annotations

from typing import Any

from .config import Settings
from .metrics import Metrics
from .store import TokenStore


def create_admin_app(store: TokenStore, settings: Settings, metrics: Metrics) -> Any:
    from .auth import respond

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await respond(
            send, 404, b'{"error":{"code":"NOT_FOUND","message":"No such endpoint.","details":{}}}'
        )

    return app
