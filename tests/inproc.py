"""In-process authgate: a Runtime against the real test Valkey, called via httpx.ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from authgate.app import Runtime, WorkerApp
from authgate.config import Settings, load_settings
from tests.conftest import PEPPER


def settings_for(redis_url: str, **env: str) -> Settings:
    base = {"AUTHGATE_REDIS_URL": redis_url, "AUTHGATE_PEPPER": PEPPER}
    base.update(env)
    return load_settings(base)


@asynccontextmanager
async def running(
    settings: Settings, *, client_ip: str = "127.0.0.1", start: bool = False
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    runtime = Runtime(settings)
    if start:
        await runtime.start()
    transport = httpx.ASGITransport(app=WorkerApp(runtime), client=(client_ip, 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://authgate") as client:
            yield runtime, client
    finally:
        await runtime.stop()


async def create(runtime: Runtime, **spec: Any) -> tuple[str, dict[str, Any]]:
    """Create a token through the store, filling in the required attributes."""
    full: dict[str, Any] = {"name": "t", "org": "acme", "project": "tunes", "key_type": "r--"}
    full.update(spec)
    token, view = await runtime.store.create(full, "test")
    return token, view


def ask_headers(
    token: str | None, uri: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    headers = {"X-Original-URI": uri}
    if token is not None:
        headers["X-Power-Token"] = token
    headers.update(extra or {})
    return headers


def auth_scope(token: str | None, uri: str) -> dict[str, Any]:
    """The ASGI scope of an nginx auth subrequest, for calling `DataPlane.answer_now`."""
    return {
        "type": "http",
        "method": "GET",
        "path": "/auth",
        "raw_path": b"/auth",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in ask_headers(token, uri).items()],
        "client": ("127.0.0.1", 40000),
    }
