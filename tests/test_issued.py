"""The set of issued token hashes (`authgate.issued`) against a real Valkey and Cluster.

Forged tokens (well formed, checksum and all, never issued) are refused without Redis once
the set is loaded; until then, and whenever invalidations may have been lost, every unknown
token is asked of Redis as before. The end-to-end tests run `authgate serve` and count the
commands Valkey itself reports (INFO commandstats).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from authgate import tokens
from authgate.backend import connect
from authgate.issued import MERGE_AT, IssuedTokens
from authgate.store import TokenStore
from tests.cluster_harness import (
    ValkeyCluster,
    ValkeyNode,
    create_tokens,
    metric,
    poll,
    run_store,
    start_cluster,
)
from tests.conftest import PEPPER, AuthgateProcess, base_env, start_authgate
from tests.inproc import settings_for

KP = "authgate"
SCOPED = "/minimal/api/rest/v1/acme/tunes/items"


def digest_of(token: str) -> bytes:
    return tokens.Hasher(PEPPER.encode()).digest(token)


def forged() -> str:
    """Well formed (prefix, length, charset, checksum) and never issued."""
    return tokens.generate("min_")


async def loaded(url: str) -> tuple[IssuedTokens, Any]:
    client = connect(url, 2.0)
    issued = IssuedTokens(client, KP)
    await issued.load()
    return issued, client


# -- the set itself ---------------------------------------------------------------------------
def test_a_superseded_load_whose_scan_finishes_changes_nothing(node: ValkeyNode) -> None:
    """A load whose cancellation was absorbed inside a Redis call (so its scan still
    finishes) after the set became unsure, or after a newer load began, neither fails nor
    marks the set ready: only the current load publishes."""
    node.client().flushall()
    create_tokens(node.url, 3)

    async def go() -> None:
        client = connect(node.url, 2.0)
        issued = IssuedTokens(client, KP)
        try:
            issued.unsure()
            await issued._load(set())  # an older load's scan, finishing late
            assert not issued.ready and len(issued) == 0
            current = issued.load()
            await issued._load(set())  # older than `current`
            await current
            assert issued.ready and len(issued) == 3
        finally:
            await client.aclose()

    asyncio.run(go())


def test_loaded_set_holds_every_issued_token_and_no_forged_one(node: ValkeyNode) -> None:
    """After a load, every token in Redis may be issued and 20,000 forged ones surely are
    not; before the load, and once unsure, every token may be issued."""
    node.client().flushall()
    made = create_tokens(node.url, 50)

    async def go() -> None:
        client = connect(node.url, 2.0)
        issued = IssuedTokens(client, KP)
        try:
            assert issued.may_hold(digest_of(forged()))  # not loaded: ask Redis
            await issued.load()
            assert issued.ready and len(issued) == 50
            assert all(issued.may_hold(digest_of(t)) for t, _ in made)
            assert not any(issued.may_hold(digest_of(forged())) for _ in range(20_000))
            issued.unsure()
            assert not issued.ready and issued.may_hold(digest_of(forged()))
        finally:
            await client.aclose()

    asyncio.run(go())


def test_hashes_added_during_a_load_are_kept(node: ValkeyNode) -> None:
    """A hash published while the SCAN runs (a token created meanwhile) is in the set once
    the load completes, as are additions beyond the merge threshold."""
    node.client().flushall()
    create_tokens(node.url, 3)
    during = digest_of(forged())
    later = [hashlib.sha256(secrets.token_bytes(16)).digest() for _ in range(MERGE_AT + 5)]

    async def go() -> None:
        client = connect(node.url, 2.0)
        issued = IssuedTokens(client, KP)
        try:
            task = issued.load()
            issued.add(during)  # before the scan has even started
            await task
            assert issued.may_hold(during) and len(issued) == 4
            for digest in later:
                issued.add(digest)
            assert all(issued.may_hold(d) for d in [during, *later])
            assert len(issued) == 4 + len(later)
            assert not issued.may_hold(digest_of(forged()))
        finally:
            await client.aclose()

    asyncio.run(go())


def test_load_reads_every_cluster_primary() -> None:
    """On a Redis Cluster the load scans every primary: tokens whose keys live on different
    nodes are all found."""
    cluster: ValkeyCluster = start_cluster()
    try:
        made = create_tokens(cluster.url, 30)
        placed = set()
        for member in cluster.nodes:
            with member.client() as c:
                if c.execute_command("ROLE")[0] == b"master" and c.dbsize():
                    placed.add(member.port)
        assert len(placed) >= 2  # the keys really are spread

        async def go() -> None:
            issued, client = await loaded(cluster.url)
            try:
                assert len(issued) == 30
                assert all(issued.may_hold(digest_of(t)) for t, _ in made)
                assert not issued.may_hold(digest_of(forged()))
            finally:
                await client.aclose()

        asyncio.run(go())
    finally:
        cluster.stop()


def test_start_up_with_100k_tokens_is_quick_and_small(node: ValkeyNode) -> None:
    """Loading 100,000 issued hashes takes seconds at most (about one measured, while the
    worker already serves, asking Redis) and holds about 8 bytes per token."""
    node.client().flushall()
    with node.client() as c:
        pipe = c.pipeline(transaction=False)
        for _ in range(100_000):
            pipe.set(f"{KP}:th:{secrets.token_hex(32)}", b"{}")
        pipe.execute()
        c.set(f"{KP}:ti:tok_x", b"not a token key")

    async def go() -> tuple[int, int, float]:
        issued, client = await loaded(node.url)
        try:
            return len(issued), issued.memory_bytes(), issued.loaded_in
        finally:
            await client.aclose()

    count, size, seconds = asyncio.run(go())
    assert count == 100_000
    assert size / count <= 10
    assert seconds < 10, seconds  # about 1 s measured; the margin is for a busy machine
    node.client().flushall()


# -- authgate serve: floods, new tokens, reconnects --------------------------------------------
@pytest.fixture(scope="module")
def gate(node: ValkeyNode) -> Iterator[AuthgateProcess]:
    node.client().flushall()
    ag = start_authgate(base_env(node.url))
    poll("issued set loaded", lambda: metric(ag.metrics_url, "authgate_issued_set_ready") == 1)
    yield ag
    ag.stop()


def _request(token: str, client_ip: str) -> bytes:
    return (
        f"GET /auth HTTP/1.1\r\nHost: a\r\nX-Original-URI: {SCOPED}?pwt={token}\r\n"
        f"X-Power-Token: {token}\r\nX-Real-IP: {client_ip}\r\n\r\n"
    ).encode()


def _status(head: bytes) -> int:
    """The real status of an nginx-dialect answer (X-Authgate-Status, else the line's)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"x-authgate-status":
            return int(value)
    return int(head.split()[1])


def flood(port: int, count: int, batch: int = 100) -> list[int]:
    """`count` distinct forged tokens from as many client addresses, pipelined on one
    keep-alive connection; the real statuses."""
    statuses: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        buf = b""
        for start in range(0, count, batch):
            n = min(batch, count - start)
            ips = [f"10.{(start + i) >> 16 & 255}.{(start + i) >> 8 & 255}.{(start + i) & 255}"
                   for i in range(n)]  # fmt: skip
            sock.sendall(b"".join(_request(forged(), ip) for ip in ips))
            while buf.count(b"\r\n\r\n") < n:
                chunk = sock.recv(65536)
                assert chunk, "authgate closed the connection"
                buf += chunk
            heads = buf.split(b"\r\n\r\n")
            buf = b"\r\n\r\n".join(heads[n:])
            statuses.extend(_status(head) for head in heads[:n])
    return statuses


def commands(node: ValkeyNode) -> int:
    """Commands Valkey has served, but the INFO calls that count them and the pings."""
    with node.client() as c:
        stats = c.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_ping"))


def ask(port: int, token: str) -> int:
    """One nginx-style /auth call; its real status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_request(token, "127.0.0.1"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        return _status(head.split(b"\r\n\r\n")[0])


def test_forged_flood_costs_redis_under_one_command_per_100_requests(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """5,000 distinct never-issued well-formed tokens from 5,000 client addresses are all
    refused 404 TOKEN_INVALID at a cost of fewer than 50 Redis commands in all, while a
    token created in the middle of the flood is allowed on its first use, within a second."""
    before = commands(node)
    results: list[list[int]] = []
    runner = threading.Thread(target=lambda: results.append(flood(gate.port, 5_000)))
    runner.start()
    created_at = time.monotonic()
    [(fresh, _)] = create_tokens(node.url, 1)
    status = ask(gate.port, fresh)
    first_use = time.monotonic() - created_at
    runner.join()
    assert status == 200 and first_use < 1.0, (status, first_use)
    [statuses] = results
    assert statuses == [404] * 5_000
    spent = commands(node) - before
    # the token's creation (4 writes, an audit entry, a publish), its GET and usage writes
    assert spent < 50, spent
    # Counts reach /metrics within the flush delay: wait for the last of them.
    deadline = time.monotonic() + 5
    while metric(gate.metrics_url, 'authgate_cache_total{result="unissued"') < 5_000:
        assert time.monotonic() < deadline, "fewer than 5,000 refusals counted as unissued"
        time.sleep(0.05)


class SilentStore(TokenStore):
    """A store whose changes publish nothing: as if the invalidation had been lost."""

    async def _publish(self, digest: str) -> None:
        return None


def test_a_lost_invalidation_is_recovered_by_the_reload_after_a_reconnect(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """A token whose creation was never announced is refused as never issued; once the
    subscription is dropped (CLIENT KILL), authgate re-subscribes, reloads the set and
    allows it; during the gap every unknown token is asked of Redis."""

    async def make(store: Any) -> str:
        silent = SilentStore(store.redis, store.settings)
        token, _ = await silent.create(
            {"name": "s", "org": "acme", "project": "tunes", "key_type": "r--"}, "test"
        )
        return token

    token = run_store(node.url, make)
    assert ask(gate.port, token) == 404  # the set did not hear of it
    flushes = metric(gate.metrics_url, 'authgate_invalidations_total{kind="flush"')
    with node.client() as c:
        c.client_kill_filter(_type="pubsub")
    poll(
        "re-subscribed",
        lambda: metric(gate.metrics_url, 'authgate_invalidations_total{kind="flush"') > flushes,
    )
    poll("allowed after the reload", lambda: ask(gate.port, token) == 200, timeout=5)
    assert metric(gate.metrics_url, "authgate_issued_set_ready") == 1
    assert metric(gate.metrics_url, "authgate_issued_set_tokens") >= 1


def test_until_loaded_unknown_tokens_are_asked_of_redis(node: ValkeyNode) -> None:
    """A worker whose set is not loaded (it never subscribed) asks Redis about a forged
    token: fail safe, as without the set."""
    from authgate.app import Runtime
    from tests.inproc import auth_scope

    settings = settings_for(node.url)

    async def go() -> int:
        runtime = Runtime(settings)
        try:
            token = forged()
            with node.client() as c:
                before = c.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
            answer = runtime.data_plane.answer_now(auth_scope(token, f"{SCOPED}?pwt={token}"))
            assert not isinstance(answer, tuple)  # no decision without Redis
            status = (await answer)[0]
            with node.client() as c:
                after = c.info("commandstats")["cmdstat_get"]["calls"]
            assert after == before + 1
            return int(status)
        finally:
            await runtime.stop()

    assert asyncio.run(go()) == 401  # 404 TOKEN_INVALID, folded for nginx


def test_a_token_used_the_moment_it_is_created_is_allowed(node: ValkeyNode) -> None:
    """In one worker, a token created and used at once is allowed on that first use: its
    creation announces its hash on the channel before the record is written, so no one can
    hold the token before the set has heard of it. A forged token asked alongside is refused
    without a Redis read."""
    from tests.inproc import create, running

    node.client().flushall()

    async def go() -> None:
        async with running(settings_for(node.url), start=True) as (runtime, client):
            await runtime.invalidator.subscribed.wait()  # type: ignore[union-attr]
            while not runtime.issued.ready:
                await asyncio.sleep(0.01)
            with node.client() as c:
                gets = c.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
            bad = forged()
            rejected = await client.get(f"/auth?pwt={bad}", headers={"X-Power-Token": bad})
            assert rejected.status_code == 404
            with node.client() as c:
                assert c.info("commandstats").get("cmdstat_get", {}).get("calls", 0) == gets
            for _ in range(5):
                token, _ = await create(runtime)
                r = await client.get(f"/auth?pwt={token}", headers={"X-Power-Token": token})
                assert r.status_code == 200

    asyncio.run(go())


def test_an_announcement_read_but_not_yet_applied_is_waited_for(node: ValkeyNode) -> None:
    """A request for a token whose announcement has reached the worker's socket, but not
    yet the set (the event loop has not run the invalidation task), is not refused on the
    spot: it waits the few turns the announcement takes to apply, and is allowed."""
    from authgate.app import Runtime
    from tests.inproc import auth_scope

    node.client().flushall()
    settings = settings_for(node.url)

    async def go() -> None:
        runtime = Runtime(settings)
        await runtime.start()
        try:
            while not runtime.issued.ready:
                await asyncio.sleep(0.01)
            silent = SilentStore(runtime.redis, settings)
            spec = {"name": "s", "org": "acme", "project": "tunes", "key_type": "r--"}
            token, _ = await silent.create(spec, "test")
            with node.client() as c:  # the announcement, while this loop does not run
                c.publish(runtime.store.channel, runtime.store.hash(token))
            deadline = time.monotonic() + 5
            while runtime.invalidator.quiet():  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the announcement never arrived"
            assert not runtime.issued.may_hold(digest_of(token))  # not applied yet
            answer = runtime.data_plane.answer_now(auth_scope(token, f"{SCOPED}?pwt={token}"))
            assert not isinstance(answer, tuple)  # not refused on the spot
            assert (await answer)[0] == 200
        finally:
            await runtime.stop()

    asyncio.run(go())
