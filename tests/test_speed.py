"""The hot path's promises, checked on real `authgate serve` processes and a real Valkey:
fleet-wide invalidation, a flushed cache after a lost subscription, Redis kept out of the way
of floods and repeat requests, batched usage writes, and metrics summed across workers.

Behaviour, not speed: `make bench` measures the speed.
"""

from __future__ import annotations

import asyncio
import glob
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from authgate.config import load_settings
from authgate.store import TokenStore
from authgate.tokens import checksum, hash_token
from tests.conftest import PEPPER, AuthgateProcess, start_authgate

PATH = "/minimal/api/rest/v1/acme/tunes/items"


def ask(gate: AuthgateProcess, token: str, client: httpx.Client | None = None) -> int:
    """One nginx-style /auth request carrying `token`; the decision's real status (nginx's
    dialect carries 404 as 401 + X-Authgate-Status)."""
    headers = {"X-Original-URI": f"{PATH}?pwt={token}", "X-Power-Token": token}
    reply = (client or httpx).get(f"{gate.url}/auth", headers=headers)
    return int(reply.headers.get("x-authgate-status", reply.status_code))


class Store:
    """authgate's own TokenStore, driven from the test process."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.url = env["AUTHGATE_REDIS_URL"]
        self.settings = load_settings(env)

    def run(self, action: str, *args: Any) -> Any:
        async def go() -> Any:
            client = aioredis.Redis.from_url(self.url)
            try:
                store = TokenStore(client, self.settings)
                if action == "create":
                    spec = {"name": "s", "org": "acme", "project": "tunes", "key_type": "r--"}
                    token, view = await store.create(spec, "test")
                    return token, view["id"]
                return await getattr(store, action)(*args, "test")
            finally:
                await client.aclose()

        return asyncio.run(go())

    def create(self) -> tuple[str, str]:
        token, token_id = self.run("create")
        return str(token), str(token_id)


def calls(client: redis.Redis) -> dict[str, int]:
    """Commands Valkey has run so far, by name (INFO commandstats)."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def since(client: redis.Redis, before: Mapping[str, int], *names: str) -> int:
    after = calls(client)
    return sum(after.get(n, 0) - before.get(n, 0) for n in names)


def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` holds; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout}s")
    return time.monotonic() - started


@pytest.fixture
def gate(cli_env: dict[str, str]) -> Iterator[AuthgateProcess]:
    ag = start_authgate(cli_env)
    yield ag
    ag.stop()


@pytest.fixture
def valkey_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_changes_reach_every_instance_within_100ms(cli_env: dict[str, str]) -> None:
    """A token cached by two running instances is refused by both within 100 ms of its
    revocation or deletion, and within 100 ms of the end of its rotation grace (worst of
    several rounds)."""
    store = Store(cli_env)
    gates = [start_authgate(cli_env), start_authgate(cli_env)]
    clients = [httpx.Client(timeout=2.0) for _ in gates]
    worst: dict[str, float] = {}
    try:
        for action in ["revoke"] * 5 + ["delete"] * 2 + ["rotate"] * 2:
            token, token_id = store.create()
            for g, c in zip(gates, clients, strict=True):
                assert [ask(g, token, c) for _ in range(2)] == [200, 200]
            started = time.time()
            if action == "rotate":
                store.run("rotate", token_id, 0.3)
                assert all(ask(g, token, c) == 200 for g, c in zip(gates, clients, strict=True))
                effective = started + 0.3
            else:
                store.run(action, token_id)
                effective = started
            for g, c in zip(gates, clients, strict=True):
                until(lambda g=g, c=c, t=token: ask(g, t, c) != 200, timeout=5.0)  # type: ignore[misc]
                late = max(0.0, time.time() - effective)
                worst[action] = max(worst.get(action, 0.0), late)
    finally:
        for c in clients:
            c.close()
        for g in gates:
            g.stop()
    assert max(worst.values()) < 0.1, worst


def test_lost_subscription_flushes_the_cache(
    gate: AuthgateProcess, cli_env: dict[str, str], valkey_client: redis.Redis
) -> None:
    """A change whose invalidation was missed (here: written without one) is enforced once
    the invalidation subscription is lost and re-established, long before the cache TTL."""
    token, _ = Store(cli_env).create()
    assert ask(gate, token) == 200
    key = "authgate:th:" + hash_token(PEPPER.encode(), token)
    record = orjson.loads(valkey_client.get(key))  # type: ignore[arg-type]
    record["revoked_at"] = time.time()
    valkey_client.set(key, orjson.dumps(record), xx=True)  # no PUBLISH: the message is lost
    assert ask(gate, token) == 200  # still cached: nothing told this instance
    assert valkey_client.client_kill_filter(_type="pubsub") >= 1
    took = until(lambda: ask(gate, token) == 404, timeout=5.0)  # the cache TTL is 30 s
    assert took < 5.0


def test_bad_tokens_cost_no_redis_commands(
    cli_env: dict[str, str], valkey_client: redis.Redis
) -> None:
    """Malformed tokens (random strings, a wrong checksum, a foreign prefix, two sources that
    disagree) never reach Redis; one well-formed unknown token costs at most one GET per
    negative cache TTL however often it is sent (none once the issued set is loaded)."""
    ag = start_authgate({**cli_env, "AUTHGATE_NEGATIVE_CACHE_TTL": "60s"})
    good, _ = Store(cli_env).create()
    wrong_checksum = good[:-1] + ("A" if good[-1] != "A" else "B")
    bad = [
        os.urandom(16).hex(),
        "min_" + "x" * 38,
        wrong_checksum,
        "ak_live_" + good[4:],
        "min_!!" + good[6:],
    ]
    try:
        with httpx.Client(timeout=2.0) as client:
            before = calls(valkey_client)
            for i in range(200):
                token = bad[i % len(bad)]
                assert ask(ag, token, client) == 404
            headers = {"X-Original-URI": f"{PATH}?pwt={good}", "X-Power-Token": good[:-1]}
            mismatch = client.get(f"{ag.url}/auth", headers=headers)
            assert b"TOKEN_MISMATCH" in mismatch.headers["x-authgate-error"].encode()
            assert since(valkey_client, before, "get") == 0
            body = good[:10] + good[10:-6].swapcase()
            unknown = body + checksum(body)  # well-formed, never issued
            before = calls(valkey_client)
            for _ in range(200):
                assert ask(ag, unknown, client) == 404
            assert since(valkey_client, before, "get") <= 1  # none once the issued set is loaded
    finally:
        ag.stop()


def test_first_use_is_one_get_however_many_requests_arrive(
    gate: AuthgateProcess, cli_env: dict[str, str], valkey_client: redis.Redis
) -> None:
    """Thirty requests carrying a token the instance has never seen, all at once, cost one
    Redis GET between them; later requests cost none."""
    token, _ = Store(cli_env).create()
    headers = {"X-Original-URI": f"{PATH}?pwt={token}", "X-Power-Token": token}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gate.url, timeout=5.0) as client:
            answers = await asyncio.gather(
                *(client.get("/auth", headers=headers) for _ in range(30))
            )
        return [a.status_code for a in answers]

    before = calls(valkey_client)
    assert asyncio.run(burst()) == [200] * 30
    assert asyncio.run(burst()) == [200] * 30
    assert since(valkey_client, before, "get") == 1


def test_usage_is_written_in_batches(
    gate: AuthgateProcess, cli_env: dict[str, str], valkey_client: redis.Redis
) -> None:
    """Five hundred allowed requests cause no Redis write of their own: request counts and
    last-used times reach Redis in a few batched writes, and add up."""
    token, token_id = Store(cli_env).create()
    before = calls(valkey_client)
    started = time.time()
    with httpx.Client(timeout=2.0) as client:
        for _ in range(500):
            assert ask(gate, token, client) == 200
    key = f"authgate:usage:{token_id}"
    until(lambda: valkey_client.hget(key, "count") == b"500", timeout=5.0)
    seconds = time.time() - started
    writes = since(valkey_client, before, "set", "hset", "hincrby", "hincrbyfloat", "incr")
    assert writes <= 2 * (seconds / 1.0 + 2), (writes, seconds)  # one batch a second
    last = float(valkey_client.hget(key, "last_used_at") or 0)
    assert started - 1 <= last <= time.time() + 1


def test_metrics_add_up_across_two_workers(cli_env: dict[str, str]) -> None:
    """With two workers, both decide requests and /metrics reports the sum of their counts."""
    metrics_dir = tempfile.mkdtemp(prefix="authgate-metrics-test-")
    ag = start_authgate({**cli_env, "AUTHGATE_METRICS_DIR": metrics_dir}, workers=2)
    token, _ = Store(cli_env).create()
    headers = {"X-Original-URI": f"{PATH}?pwt={token}", "X-Power-Token": token}

    async def many(n: int) -> list[int]:
        async def one() -> int:  # a new connection each: the kernel spreads them
            async with httpx.AsyncClient(base_url=ag.url, timeout=5.0) as client:
                return (await client.get("/auth", headers=headers)).status_code

        return list(await asyncio.gather(*(one() for _ in range(n))))

    try:
        for _ in range(20):
            assert asyncio.run(many(20)) == [200] * 20
        total = 400.0

        def reported() -> float:
            text = httpx.get(ag.metrics_url).text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("authgate_decisions_total{") and 'code="OK"' in line
            )

        until(lambda: reported() == total, timeout=5.0)
        per_worker = worker_counts(metrics_dir)
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker
        assert sum(per_worker) == total
    finally:
        ag.stop()


def worker_counts(metrics_dir: str) -> list[float]:
    """Allowed decisions each worker has written to its own counter file."""
    from prometheus_client.mmap_dict import MmapedDict

    out = []
    for path in sorted(glob.glob(os.path.join(metrics_dir, "counter_*.db"))):
        total = 0.0
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
            name, _, labels, _ = orjson.loads(key)
            if name == "authgate_decisions" and labels.get("code") == "OK":
                total += value
        out.append(total)
    return [n for n in out if n]


def test_usage_flush_goes_in_chunks_and_keeps_what_failed(
    cli_env: dict[str, str], valkey_client: redis.Redis
) -> None:
    """Usage of many tokens is written a chunk at a time (the event loop answers requests
    in between); when a chunk fails, it and the rest are kept for the next flush, and the
    chunks already written are not counted twice."""
    from authgate.errors import BackendUnavailable
    from authgate.usage import CHUNK, UsageRecorder

    ids = [f"tok_{i:04d}" for i in range(CHUNK * 3 + 7)]
    recorder = UsageRecorder()
    for n, token_id in enumerate(ids):
        for _ in range(n % 3 + 1):
            recorder.note(token_id)

    async def go() -> list[int]:
        client = aioredis.Redis.from_url(cli_env["AUTHGATE_REDIS_URL"])
        store = TokenStore(client, load_settings(cli_env))
        sizes: list[int] = []

        async def flush(chunk: dict[str, tuple[int, float]]) -> None:
            sizes.append(len(chunk))
            if len(sizes) == 3:
                raise BackendUnavailable("redis: lost in the middle")
            await store.record_usage(chunk)

        try:
            await recorder.flush_once(flush)  # the third chunk fails
            await recorder.flush_once(flush)
        finally:
            await client.aclose()
        return sizes

    sizes = asyncio.run(go())
    assert sizes == [CHUNK, CHUNK, CHUNK, CHUNK, 7]
    counts = [valkey_client.hget(f"authgate:usage:{t}", "count") for t in ids]
    assert counts == [str(n % 3 + 1).encode() for n in range(len(ids))]
