"""The console's sessions (against a real Valkey) and its usage chart, without a browser."""

from __future__ import annotations

import asyncio
import re
import time

import redis.asyncio as aioredis

from authgate.console.chart import usage_svg
from authgate.console.session import SessionStore


def run_sessions(url: str, ttl: float, body: object) -> object:
    async def go() -> object:
        client = aioredis.Redis.from_url(url)
        try:
            return await body(SessionStore(client, "authgate", b"pepper-for-tests", ttl))  # type: ignore[operator]
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_a_session_cookie_opens_its_session_until_signed_out(redis_url: str) -> None:
    """The signed cookie finds the session; a changed signature or id finds nothing; after
    `end` the same cookie finds nothing either."""

    async def body(store: SessionStore) -> None:
        session = await store.create("tok_01M8SP92FBGJH6YH3N42VETF3F")
        cookie = store.cookie_value(session)
        found = await store.load(cookie)
        assert found is not None and found.token_id == "tok_01M8SP92FBGJH6YH3N42VETF3F"
        session_id, signature = cookie.split(".")
        assert await store.load(f"{session_id}.{'0' * len(signature)}") is None
        assert await store.load(f"{session_id[:-1]}x.{signature}") is None
        assert await store.load(None) is None and await store.load("junk") is None
        await store.end(session)
        assert await store.load(cookie) is None

    run_sessions(redis_url, 60, body)


def test_redis_holds_neither_the_session_id_nor_the_token(redis_url: str) -> None:
    """Keys are an HMAC of the session id; the value holds the token's id, no secret."""

    async def body(store: SessionStore) -> None:
        session = await store.create("tok_01M8SP92FBGJH6YH3N42VETF3G")
        keys = [k.decode() for k in await store.redis.keys("authgate:console:*")]
        assert keys and all(session.id not in k for k in keys)
        raw = (await store.redis.get(keys[0])).decode()
        assert session.id not in raw and "tok_01M8SP92FBGJH6YH3N42VETF3G" in raw

    run_sessions(redis_url, 60, body)


def test_a_session_ends_by_itself_after_its_ttl(redis_url: str) -> None:
    """An idle session is gone once its TTL has passed."""

    async def body(store: SessionStore) -> None:
        cookie = store.cookie_value(await store.create("tok_01M8SP92FBGJH6YH3N42VETF3H"))
        assert await store.load(cookie) is not None
        deadline = time.monotonic() + 5
        while await store.load(cookie) is not None:
            assert time.monotonic() < deadline, "the session outlived its TTL"
            await asyncio.sleep(0.1)

    run_sessions(redis_url, 1, body)


def test_a_one_time_form_value_is_accepted_once(redis_url: str) -> None:
    """A create or rotate form posted twice mints once."""

    async def body(store: SessionStore) -> None:
        assert await store.spend("nonce-1") is True
        assert await store.spend("nonce-1") is False
        assert await store.spend("") is False and await store.spend(None) is False

    run_sessions(redis_url, 60, body)


def test_the_chart_draws_each_day_in_proportion() -> None:
    """Bar heights follow the counts; the busiest day fills the plot; codes are escaped."""
    days = [
        {"date": "2026-11-01", "allowed": 10, "denied": {}},
        {"date": "2026-11-02", "allowed": 5, "denied": {"TOKEN_DISABLED": 5}},
        {"date": "2026-11-03", "allowed": 0, "denied": {"<script>": 2}},
    ]
    svg = usage_svg(days)
    heights = [float(h) for h in re.findall(r'height="([0-9.]+)" class="bar', svg)]
    assert len(heights) == 4  # 10 | 5 + 5 | 2 (an unknown code is "other")
    assert heights[0] == heights[1] + heights[2]
    assert abs(heights[3] - heights[0] / 5) < 0.2
    assert "<script>" not in svg and "style=" not in svg
    assert 'class="bar other"' in svg and 'class="bar disabled"' in svg


def test_the_chart_of_a_token_without_traffic_has_no_bars() -> None:
    svg = usage_svg([{"date": "2026-11-01", "allowed": 0, "denied": {}}])
    assert svg.startswith("<svg") and "<rect" not in svg
