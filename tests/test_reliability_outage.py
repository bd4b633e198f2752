"""Redis outages seen by a real `authgate serve` over real sockets.

A Valkey of the module's own (append-only, so a restart keeps its data) is killed,
paused, slowed and restarted under authgate; every answer is judged against what the
token really is. Wrong decisions, client-visible errors and token values in the log
must all stay at zero.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.cluster_harness import (
    TOKEN_PATTERN,
    Blackhole,
    Load,
    Probe,
    Result,
    ValkeyNode,
    ask,
    create_tokens,
    metric,
    poll,
    proc_children,
    revoke,
    unknown_token,
)
from tests.conftest import AuthgateProcess, base_env, start_authgate

TIMEOUT = 0.25  # AUTHGATE_REDIS_TIMEOUT's default
ISSUED: list[str] = []  # every token value made here: none may reach a log


def tokens(url: str, count: int = 1, **spec: object) -> list[tuple[str, str]]:
    made = create_tokens(url, count, **spec)
    ISSUED.extend(t for t, _ in made)
    return made


@pytest.fixture(autouse=True)
def node_back_up(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test did to the module's Valkey, the next one finds it answering."""
    yield
    if "node" in request.fixturenames:
        server: ValkeyNode = request.getfixturevalue("node")
        server.resume()
        if not server.running:
            server.start()


@pytest.fixture(scope="module")
def gate(node: ValkeyNode) -> Iterator[AuthgateProcess]:
    ag = start_authgate(base_env(node.url))
    yield ag
    ag.stop()
    assert_no_tokens_in(ag.log())


def assert_no_tokens_in(text: str) -> None:
    assert not [t for t in ISSUED if t in text]
    assert not re.findall(TOKEN_PATTERN, text)


def counted(ag: AuthgateProcess, name: str, check: Callable[[float], bool]) -> None:
    """Wait for a metric to satisfy `check` (workers publish their counts within ~50 ms)."""
    poll(name, lambda: check(metric(ag.metrics_url, name)), timeout=5)


def wait_ready(ag: AuthgateProcess, ready: bool = True) -> float:
    want = 200 if ready else 503
    return poll(
        f"/readyz == {want}", lambda: httpx.get(f"{ag.url}/readyz", timeout=5).status_code == want
    )


def test_outage_serves_cached_tokens_and_refuses_unknown_ones(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """While Redis is down, cached tokens keep their decision, unknown ones get 503.

    Malformed and missing tokens are still judged (no Redis needed), /healthz stays
    up, /readyz fails, and the outage shows in authgate_redis_errors_total and
    authgate_redis_up; once Redis is back, all of it recovers without a restart.
    """
    [(good, _), (gone, gone_id)] = tokens(node.url, 2)
    revoke(node.url, gone_id)
    assert ask(gate.url, good).status == 200
    assert ask(gate.url, gone).code == "TOKEN_INVALID"
    errors_before = metric(gate.metrics_url, "authgate_redis_errors_total")

    node.kill()
    for _ in range(5):
        assert ask(gate.url, good).status == 200
        assert ask(gate.url, gone).status == 404
    stranger = unknown_token()
    answer = ask(gate.url, stranger)
    assert (answer.status, answer.code) == (503, "UNAVAILABLE")
    assert answer.headers["x-authgate-status"] == "503"
    direct = ask(gate.url, unknown_token(), nginx=False)
    assert (direct.status, direct.code) == (503, "UNAVAILABLE")
    assert ask(gate.url, "min_notatoken").code == "TOKEN_INVALID"
    assert ask(gate.url, None).code == "TOKEN_MISSING"
    assert httpx.get(f"{gate.url}/healthz").status_code == 200
    wait_ready(gate, ready=False)
    counted(gate, "authgate_redis_errors_total", lambda v: v > errors_before)
    counted(gate, "authgate_redis_up", lambda v: v == 0)

    node.start()
    wait_ready(gate)
    poll("unknown token judged again", lambda: ask(gate.url, stranger).status == 404)
    assert ask(gate.url, good).status == 200
    counted(gate, "authgate_redis_up", lambda v: v == 1)


def test_revocation_seen_before_an_outage_holds_through_it(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """A token revoked (and seen revoked) before Redis fails stays denied during the outage."""
    [(token, token_id)] = tokens(node.url)
    assert ask(gate.url, token).status == 200
    revoke(node.url, token_id)
    took = poll("revocation enforced", lambda: ask(gate.url, token).status == 404)
    assert took < 0.5
    node.kill()
    answers = {ask(gate.url, token).status for _ in range(20)}
    assert answers == {404}


def wait_subscribed(node: ValkeyNode, subscribers: int = 1) -> None:
    """Wait until `subscribers` invalidation subscriptions are live on `node`."""

    def live() -> bool:
        with node.client() as c:
            return int(c.pubsub_numsub("authgate:invalidate")[0][1]) >= subscribers

    poll("invalidation subscribers", live)


def _worker_pids(ag: AuthgateProcess) -> list[int]:
    pids = proc_children(ag.proc.pid)
    assert pids, "no worker process"
    return pids


def test_invalidations_missed_while_unsubscribed_are_flushed(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """A revocation published while the subscription is down is not lost: reconnecting flushes.

    The worker is frozen, its pub/sub connection is cut and the token revoked (nobody hears
    the invalidation); once the worker runs again it must notice, re-subscribe and flush,
    instead of serving the cached token until its TTL runs out.
    """
    [(token, token_id)] = tokens(node.url)
    wait_subscribed(node)
    assert ask(gate.url, token).status == 200
    flushes = metric(gate.metrics_url, 'authgate_invalidations_total{kind="flush"')
    workers = _worker_pids(gate)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        with node.client() as c:
            assert c.client_kill_filter(_type="pubsub") >= 1
        revoke(node.url, token_id)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    took = poll("missed revocation enforced", lambda: ask(gate.url, token).status == 404, 5)
    assert took < 3.0
    counted(gate, 'authgate_invalidations_total{kind="flush"', lambda v: v > flushes)


def test_paused_redis_does_not_stall_decisions(node: ValkeyNode, gate: AuthgateProcess) -> None:
    """A Redis that holds its connections open and never answers costs at most the timeout.

    Cached tokens answer at cache speed, issued tokens not in the cache get 503 after about
    AUTHGATE_REDIS_TIMEOUT, and /healthz never waits behind them. (Never-issued ones are
    refused from memory, as known-unknown ones are: see tests/test_issued.py.)
    """
    [(good, _)] = tokens(node.url)
    uncached = iter([t for t, _ in tokens(node.url, 40)])
    assert ask(gate.url, good).status == 200
    node.pause()

    async def run() -> tuple[list[float], list[tuple[int, float]]]:
        # The strangers' connections are open and their requests written before /healthz is
        # timed, so what is measured is authgate, not this client setting them up.
        conns = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", gate.port) for _ in range(40))
        )
        async with httpx.AsyncClient(base_url=gate.url, timeout=10) as prober:
            assert (await prober.get("/healthz")).status_code == 200  # its connection is open

            async def stranger(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> tuple[int, float]:
                started = time.monotonic()
                writer.write(Probe("stranger", next(uncached)).request())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                writer.close()
                took = time.monotonic() - started
                real = re.search(rb"(?i)\r\nx-authgate-status: *(\d+)", head)  # nginx dialect
                return int(real.group(1) if real else head.split(b" ", 2)[1]), took

            pending = [asyncio.ensure_future(stranger(r, w)) for r, w in conns]
            await asyncio.sleep(0)  # every request written
            healths = []
            for _ in range(10):
                started = time.monotonic()
                assert (await prober.get("/healthz")).status_code == 200
                healths.append(time.monotonic() - started)
            return healths, list(await asyncio.gather(*pending))

    healths, strangers = asyncio.run(run())
    assert {s for s, _ in strangers} == {503}
    assert max(t for _, t in strangers) < TIMEOUT + 0.5
    assert max(healths) < 0.1
    with httpx.Client() as client:  # one client: its own setup is not timed five times
        cached = [ask(gate.url, good, client=client) for _ in range(5)]
    assert {a.status for a in cached} == {200}
    assert max(a.seconds for a in cached) < 0.1


def test_blackholed_redis_answers_503_within_the_timeout() -> None:
    """Pointed at a socket that accepts and never answers, authgate starts, is alive but
    not ready, and answers unknown tokens 503 within the Redis timeout."""
    hole = Blackhole()
    ag = start_authgate(base_env(hole.url), wait_ready=False)
    try:
        started = time.monotonic()
        assert httpx.get(f"{ag.url}/readyz", timeout=5).status_code == 503
        assert time.monotonic() - started < TIMEOUT + 0.5
        for _ in range(5):
            answer = ask(ag.url, unknown_token())
            assert (answer.status, answer.code) == (503, "UNAVAILABLE")
            assert answer.seconds < TIMEOUT + 0.5
        assert ask(ag.url, "min_notatoken").code == "TOKEN_INVALID"
        counted(ag, "authgate_redis_errors_total", lambda v: v >= 5)
    finally:
        ag.stop()
        hole.close()
    assert "Traceback" not in ag.log()


def test_stale_window_is_bounded(node: ValkeyNode) -> None:
    """Cached decisions outlive the start of an outage by AUTHGATE_STALE_WINDOW, not longer."""
    ttl, stale = 0.2, 1.0
    ag = start_authgate(
        base_env(node.url, AUTHGATE_CACHE_TTL=f"{ttl}s", AUTHGATE_STALE_WINDOW=f"{stale}s")
    )
    try:
        [(good, _)] = tokens(node.url)
        assert ask(ag.url, good).status == 200
        node.kill()
        killed = time.monotonic()
        assert ask(ag.url, good).status == 200
        poll("stale entry expired", lambda: ask(ag.url, good).status == 503, 10)
        lasted = time.monotonic() - killed
        assert stale * 0.5 < lasted < ttl + stale + 0.5
    finally:
        ag.stop()
    assert_no_tokens_in(ag.log())


def _debug_sleep(node: ValkeyNode, seconds: float) -> None:
    with node.client(timeout=seconds + 5) as c:
        c.execute_command("DEBUG", "SLEEP", seconds)


def test_faults_under_load_make_no_wrong_decision(node: ValkeyNode, gate: AuthgateProcess) -> None:
    """Under steady load: Redis slowed past the timeout, slowed within it, a revocation, a
    kill and restart, and a pause. Every answer is judged: no allow for revoked or unknown
    tokens, a revocation enforced within 100 ms, no 5xx but 503, no dropped connection,
    /healthz always quick, and no token in the log. A 503 is right only for a token the
    instance had not cached, asked while an injected outage was going on; cached tokens
    keep their answer through every fault, and a slow Redis never causes a 503."""
    good = tokens(node.url, 3)
    [(revoked, revoked_id), (churn, churn_id)] = tokens(node.url, 2)
    revoke(node.url, revoked_id)
    stranger = unknown_token()
    probes = [
        *(Probe(f"good{i}", t) for i, (t, _) in enumerate(good)),
        Probe("revoked", revoked),
        Probe("unknown", stranger),
        Probe("stranger", "", fresh=True),
        Probe("malformed", "min_0000"),
        Probe("churn", churn),
        Probe("healthz", "", target="/healthz"),
    ]
    # The first subscription flushes the cache: only tokens asked after it are cached, and
    # on a slow start it can come as late as the first fault.
    wait_subscribed(node)
    for p in probes[:-1]:
        ask(gate.url, p.token)
    load = Load(gate.port, probes, concurrency=16, rate=1500)
    marks: dict[str, float] = {}
    outages: list[tuple[float, float]] = []  # when Redis gave no answer, monotonic
    flush = 'authgate_invalidations_total{kind="flush"'

    async def progress(answers: int) -> None:
        """Let the load make `answers` more answers (the clock of this choreography)."""
        target = load.total + answers
        while load.total < target:
            await asyncio.sleep(0.01)

    async def faults(done: asyncio.Event) -> None:
        try:
            await progress(300)
            began = time.monotonic()
            await asyncio.to_thread(_debug_sleep, node, 0.6)  # slower than the timeout
            outages.append((began, time.monotonic()))
            await asyncio.to_thread(_debug_sleep, node, 0.1)  # slow, within the timeout
            await progress(100)
            await asyncio.to_thread(revoke, node.url, churn_id)
            marks["revoked"] = time.monotonic()
            await progress(200)
            flushes = metric(gate.metrics_url, flush)
            node.kill()
            began = time.monotonic()
            await progress(600)
            await asyncio.to_thread(node.start)
            outages.append((began, time.monotonic()))
            await asyncio.to_thread(wait_ready, gate)
            # Re-subscribed (and so flushed) while Redis answers: the cached tokens are
            # read again before the next fault.
            await asyncio.to_thread(counted, gate, flush, lambda v: v > flushes)
            await progress(300)
            node.pause()
            began = time.monotonic()
            await progress(600)
            node.resume()
            outages.append((began, time.monotonic()))
            await progress(300)
        finally:
            node.resume()
            done.set()

    async def run() -> None:
        done = asyncio.Event()
        await asyncio.gather(load.run_until(done), faults(done))

    asyncio.run(run())

    def during_outage(r: Result) -> bool:
        return any(r.sent <= end and r.done >= began for began, end in outages)

    def wrong(r: Result) -> bool:
        status, name, sent = r.status, r.probe, r.sent
        if name == "healthz":
            return status != 200
        if name.startswith("good"):
            return status != 200
        if name == "revoked" or name == "malformed":
            return status != 404
        if name in ("unknown", "stranger"):
            return status != 404 and not (status == 503 and during_outage(r))
        if name == "churn":
            if sent > marks["revoked"] + 0.1:
                return status != 404
            return status not in (200, 404)
        raise AssertionError(name)

    bad = [r for r in load.results if wrong(r)]
    errors = [r for r in load.results if r.status == 0 or (r.status >= 500 and r.status != 503)]
    unavailable = sum(1 for r in load.results if r.status == 503)
    health = sorted(r.done - r.sent for r in load.of("healthz"))
    summary = (
        f"{load.total} answers, {unavailable} x 503, {len(bad)} wrong, {len(errors)} errors, "
        f"{load.connect_errors} connect errors, /healthz max {health[-1] * 1000:.1f} ms"
    )
    print(summary)
    assert not bad, f"{summary}; first: {[(r.probe, r.status) for r in bad[:5]]}"
    assert not errors and not load.connect_errors, summary
    assert health[int(len(health) * 0.99)] < 0.1, summary
    assert unavailable > 0, "the faults never reached authgate: the test proves nothing"
    assert {r.status for r in load.of("good0")} >= {200}
    assert_no_tokens_in(gate.log())


def test_a_stalled_worker_does_not_blame_a_healthy_redis(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """A worker that does not run for longer than the Redis timeout (descheduled on a busy
    machine; here SIGSTOP) while its lookups are in flight answers them from Redis once it
    runs again: the reply waited in the socket, Redis was never silent, so no 503."""
    [(good, _)] = tokens(node.url)
    assert ask(gate.url, good).status == 200
    load = Load(gate.port, [Probe("stranger", "", fresh=True), Probe("good", good)], 16, 1000)
    stalls: list[tuple[float, float]] = []

    async def stall(done: asyncio.Event) -> None:
        workers = _worker_pids(gate)
        try:
            for _ in range(6):
                target = load.total + 200
                while load.total < target:
                    await asyncio.sleep(0.01)
                began = time.monotonic()
                for pid in workers:
                    os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(TIMEOUT + 0.15)
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
                stalls.append((began, time.monotonic()))
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            done.set()

    async def run() -> None:
        done = asyncio.Event()
        await asyncio.gather(load.run_until(done), stall(done))

    asyncio.run(run())
    caught = [
        r
        for r in load.of("stranger")
        if any(r.sent < began and r.done > end for began, end in stalls)
    ]
    assert caught, "no lookup was in flight across a stall: the test proves nothing"
    assert {r.status for r in load.of("stranger")} == {404}, load.statuses
    assert {r.status for r in load.of("good")} == {200}, load.statuses


def test_connections_redis_closed_while_idle_cost_no_503(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """Redis (or a proxy in front of it) closing the lookup connections that sit idle in the
    pool, as an idle `timeout` or CLIENT KILL does, is not an outage: the next lookups run
    on new connections and every one is answered. (Issued tokens on their first use: only
    those reach Redis, never-issued ones are refused from memory.)"""
    fresh = iter([t for t, _ in tokens(node.url, 30)])
    for _ in range(3):
        with httpx.Client(base_url=gate.url) as warm:
            for _ in range(5):
                assert ask(gate.url, next(fresh), client=warm).status == 200
        with node.client() as c:
            assert c.client_kill_filter(_type="normal", skipme=True) >= 1
        answers = [ask(gate.url, next(fresh)) for _ in range(5)]
        assert [a.status for a in answers] == [200] * 5, [a.code for a in answers]


def test_a_slow_redis_makes_misses_wait_not_fail(node: ValkeyNode) -> None:
    """While Redis is slow but within the timeout, misses that arrive one per event-loop
    turn all get their answer (none UNAVAILABLE), and the lookup client holds at most
    LOOKUP_CONNECTIONS connections: further misses wait and share the next read, so a slow
    Redis cannot run the pool out of connections (a full pool refuses at once: 503)."""
    from authgate.app import Runtime
    from authgate.backend import LOOKUP_CONNECTIONS
    from authgate.plane import Decision
    from tests.inproc import settings_for

    count, spacing, slow = 500, 0.0005, 0.3

    async def go() -> list[object]:
        runtime = Runtime(settings_for(node.url, AUTHGATE_REDIS_TIMEOUT="1s"))
        try:
            await runtime.authorizer.store.redis.ping()
            loop = asyncio.get_running_loop()
            started: list[asyncio.Future[object]] = []
            sleeping = asyncio.ensure_future(asyncio.to_thread(_debug_sleep, node, slow))
            await asyncio.sleep(0.02)
            for i in range(count):
                token = unknown_token()
                loop.call_later(
                    i * spacing,
                    lambda t=token: started.append(
                        asyncio.ensure_future(runtime.authorizer.lookup(t))
                    ),
                )
            await asyncio.sleep(count * spacing + 0.01)
            await sleeping
            return list(await asyncio.gather(*started))
        finally:
            await runtime.stop()

    with node.client() as c:
        c.config_resetstat()  # connections are counted from here
    found = asyncio.run(go())
    assert len(found) == count
    assert not [f for f in found if isinstance(f, Decision)], "a slow Redis answered 503"
    assert found == [None] * count
    with node.client() as c:
        peak = int(c.info("stats")["total_connections_received"])
    assert peak <= LOOKUP_CONNECTIONS + 3, f"{peak} connections for lookups"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(lambda: MaxConnectionsError("Too many connections"), "pool", id="pool-full"),
        pytest.param(lambda: RedisConnectionError("Too many connections"), "pool", id="pool-5"),
        pytest.param(lambda: RedisConnectionError("No connection available."), "pool", id="wait"),
        pytest.param(lambda: RedisTimeoutError("Timeout reading"), "timeout", id="read-timeout"),
        pytest.param(lambda: TimeoutError(), "timeout", id="asyncio-timeout"),
        pytest.param(lambda: ConnectionRefusedError(111, "refused"), "connection", id="refused"),
        pytest.param(lambda: RedisConnectionError("Connection closed by server."), "connection"),
        pytest.param(lambda: RedisClusterException("no node"), "connection", id="cluster"),
        pytest.param(lambda: ResponseError("LOADING Redis is loading"), "error", id="loading"),
    ],
)
def test_each_redis_failure_has_its_reason(error: Callable[[], Exception], reason: str) -> None:
    """The redis-py and OS errors a lookup can end in map to the metric's reason labels."""
    from authgate.backend import reason_of
    from authgate.errors import UNAVAILABLE_REASONS

    assert reason_of(error()) == reason
    assert reason in UNAVAILABLE_REASONS


def _unused_port() -> int:
    from tests.cluster_harness import free_port

    return free_port()


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param("connection", id="redis-refuses-connections"),
        pytest.param("timeout", id="redis-never-answers"),
        pytest.param("malformed", id="record-not-readable"),
        pytest.param("error", id="redis-answers-an-error"),
    ],
)
def test_lookups_ending_in_503_are_counted_by_reason_across_workers(
    node: ValkeyNode, reason: str
) -> None:
    """Each lookup answered 503 counts once in authgate_lookup_unavailable_total under its
    reason, summed over two worker processes; the other reasons stay at zero."""
    from authgate.tokens import hash_token
    from tests.conftest import PEPPER

    strangers = [unknown_token() for _ in range(12)]
    hole = Blackhole()
    if reason == "connection":
        url = f"redis://127.0.0.1:{_unused_port()}/0"
    elif reason == "timeout":
        url = hole.url
    else:
        url = node.url
        with node.client() as c:
            for token in strangers:
                key = f"authgate:th:{hash_token(PEPPER.encode(), token)}"
                if reason == "malformed":
                    c.set(key, b"{not json")
                else:  # GET on a list: Redis answers WRONGTYPE
                    c.rpush(key, b"x")
    ag = start_authgate(base_env(url, AUTHGATE_WORKERS="2"), workers=2, wait_ready=False)
    try:

        async def all_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=ag.url, timeout=10) as client:
                return list(
                    await asyncio.gather(
                        *(
                            client.get(
                                "/auth",
                                headers={"X-Forwarded-Uri": f"/x?pwt={t}", "X-Power-Token": t},
                            )
                            for t in strangers
                        )
                    )
                )

        answers = asyncio.run(all_at_once())
        assert [r.status_code for r in answers] == [503] * len(strangers)
        name = "authgate_lookup_unavailable_total"
        counted(ag, f'{name}{{reason="{reason}"', lambda v: v == len(strangers))
        assert metric(ag.metrics_url, name) == len(strangers)
    finally:
        ag.stop()
        hole.close()
        if reason in ("malformed", "error"):
            with node.client() as c:
                c.flushall()
    assert "Traceback" not in ag.log()
    assert_no_tokens_in(ag.log())


def test_cache_forgets_what_nobody_asks_for_any_more() -> None:
    """Entries past their stale window and expired negative entries are dropped as new ones
    arrive, so a worker's memory follows the tokens in use rather than growing with every
    token it ever saw (up to the size caps); a re-read token moves to the back."""
    from authgate.cache import TokenCache
    from authgate.model import Entry

    cache = TokenCache(ttl=1.0, stale_window=2.0, negative_ttl=1.0, size=1000, negative_size=1000)
    entry = Entry.from_record(
        {"id": "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", "org": "a", "project": "b", "key_type": "r--"}
    )
    for i in range(100):
        cache.put(b"old%d" % i, entry, 0.0, cache.generation)
        cache.put_negative(b"gone%d" % i, 0.0, cache.generation)
    cache.put(b"old0", entry, 9.0, cache.generation)  # still in use: re-read, moved back
    for i in range(100):
        cache.put(b"new%d" % i, entry, 10.0, cache.generation)
        cache.put_negative(b"unknown%d" % i, 10.0, cache.generation)
    assert len(cache) == 101
    assert len(cache._negative) == 100
    assert cache.get(b"old0", 10.5)[0] == "stale"
    assert cache.get(b"new5", 10.5)[0] == "fresh"
    assert cache.get(b"old1", 10.5)[0] == "miss"


def test_stop_ends_a_background_task_that_goes_on_after_its_cancellation(
    node: ValkeyNode,
) -> None:
    """A worker's shutdown does not hang on a background task whose cancellation was
    absorbed (a client library can turn a cancel that lands as a command times out into
    that timeout, which the task then handles as one): the task is cancelled again."""
    from authgate.app import STOP_RETRY, Runtime
    from tests.inproc import settings_for

    async def go() -> tuple[float, bool]:
        runtime = Runtime(settings_for(node.url))
        await runtime.start()
        absorbed = asyncio.Event()

        async def stubborn() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                absorbed.set()  # handled as a timeout would be
            await asyncio.sleep(3600)

        task = asyncio.create_task(stubborn())
        runtime._tasks.append(task)
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(runtime.stop(), 10 * STOP_RETRY)
        return time.monotonic() - started, absorbed.is_set() and task.cancelled()

    took, ended = asyncio.run(go())
    assert ended
    assert took < 3 * STOP_RETRY
