"""Configuration: typed settings from AUTHGATE_* and a TOML file; a bad value stops start-up
with one line naming it."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from authgate.config import ConfigError, Settings, load_settings
from tests.conftest import PEPPER, base_env, free_port

GOOD = {"AUTHGATE_PEPPER": PEPPER}


def toml(text: str) -> str:
    fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    fh.write(text)
    fh.close()
    return fh.name


def test_defaults_reproduce_the_minimal_layout() -> None:
    """Without a file: prefix min_, X-Power-Token + pwt in mode both, the three routes,
    loopback listeners, trusted loopback and private ranges."""
    s = load_settings(GOOD)
    assert s.token_prefix == "min_" and s.token_mode == "both"
    assert [x.label for x in s.token_sources] == ["header:x-power-token", "query:pwt"]
    assert [(r.cls, r.prefix) for r in s.routes] == [
        ("scoped", "/minimal/api/rest/v1/{org}/{project}"),
        ("system", "/minimal/api/system"),
        ("app", "/minimal/rest/apps/v1"),
    ]
    assert s.listen == ("127.0.0.1", 8080) and s.metrics_listen == ("127.0.0.1", 9180)
    assert s.admin_listen is None
    assert any(str(n) == "10.0.0.0/8" for n in s.trusted_proxies)


def test_pepper_is_masked_and_readable_from_a_file() -> None:
    """The pepper never shows in repr; AUTHGATE_PEPPER_FILE reads a mounted secret."""
    path = toml(PEPPER + "\n")
    s = load_settings({"AUTHGATE_PEPPER_FILE": path})
    assert s.pepper.reveal() == PEPPER.encode()
    assert PEPPER not in repr(s) and PEPPER not in str(s.pepper)


def test_environment_overrides_file() -> None:
    """A variable wins over the same key in the file."""
    path = toml('token_prefix = "ak_test_"\ncache_ttl = "10s"\n')
    s = load_settings({**GOOD, "AUTHGATE_CONFIG": path, "AUTHGATE_CACHE_TTL": "2m"})
    assert s.token_prefix == "ak_test_" and s.environment == "test"
    assert s.cache_ttl == 120.0


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        pytest.param({}, "AUTHGATE_PEPPER", id="no-pepper"),
        pytest.param({"AUTHGATE_PEPPER": "short"}, "AUTHGATE_PEPPER", id="short-pepper"),
        pytest.param(
            {**GOOD, "AUTHGATE_PEPPER_FILE": "/nonexistent"}, "AUTHGATE_PEPPER", id="both-peppers"
        ),
        pytest.param(
            {"AUTHGATE_PEPPER_FILE": "/nonexistent/pepper"},
            "AUTHGATE_PEPPER_FILE",
            id="missing-pepper-file",
        ),
        pytest.param({**GOOD, "AUTHGATE_LISTEN": "8080"}, "AUTHGATE_LISTEN", id="listen"),
        pytest.param({**GOOD, "AUTHGATE_WORKERS": "zero"}, "AUTHGATE_WORKERS", id="workers"),
        pytest.param({**GOOD, "AUTHGATE_CACHE_TTL": "soon"}, "AUTHGATE_CACHE_TTL", id="ttl"),
        pytest.param({**GOOD, "AUTHGATE_TOKEN_MODE": "all"}, "AUTHGATE_TOKEN_MODE", id="mode"),
        pytest.param(
            {**GOOD, "AUTHGATE_TOKEN_SOURCES": "cookie:x"}, "AUTHGATE_TOKEN_SOURCES", id="source"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_TOKEN_SOURCES": "bearer"},
            "AUTHGATE_TOKEN_MODE",
            id="both-with-one-source",
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_TOKEN_PREFIX": "Live-"}, "AUTHGATE_TOKEN_PREFIX", id="prefix"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_TRUSTED_PROXIES": "10.0.0.0/33"},
            "AUTHGATE_TRUSTED_PROXIES",
            id="cidr",
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_REDIS_URL": "http://x"}, "AUTHGATE_REDIS_URL", id="redis-scheme"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": "/nonexistent.toml"}, "AUTHGATE_CONFIG", id="missing-file"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": toml("routes = [")}, "AUTHGATE_CONFIG", id="bad-toml"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": toml("cache_tll = 3")}, "cache_tll", id="unknown-key"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": toml("workers = 'two'")}, "workers", id="wrong-type-in-file"
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": toml('[[routes]]\nclass = "vip"\nprefix = "/x"')},
            "routes[0].class",
            id="route-class",
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": toml('[[routes]]\nclass = "scoped"\nprefix = "/x"')},
            "routes[0].prefix",
            id="scoped-without-placeholders",
        ),
        pytest.param(
            {
                **GOOD,
                "AUTHGATE_CONFIG": toml('[[routes]]\nclass = "app"\nprefix = "/a/{app}/{app}"'),
            },
            "placeholder {app} appears more than once",
            id="placeholder-twice",
        ),
        pytest.param(
            {**GOOD, "AUTHGATE_CONFIG": toml('[[routes]]\nclass = "app"\nprefix = "/a/{user}"')},
            "unknown placeholder {user}",
            id="placeholder-unknown",
        ),
        pytest.param(
            {
                **GOOD,
                "AUTHGATE_CONFIG": toml(
                    '[[routes]]\nclass = "default"\nprefix = "/x"\npermissions = "read:x"'
                ),
            },
            "routes[0].permissions",
            id="permissions-type",
        ),
    ],
)
def test_bad_configuration_names_the_setting(env: dict[str, str], needle: str) -> None:
    """Each bad value raises ConfigError whose message names the variable or key."""
    with pytest.raises(ConfigError) as info:
        from authgate.backend import parse_redis_url

        s: Settings = load_settings(env)
        parse_redis_url(s.redis_url)
    assert needle in str(info.value)


def test_serve_refuses_bad_config_with_one_line(redis_url: str) -> None:
    """`authgate serve` with a bad value exits 2 and prints one line naming it."""
    env = base_env(redis_url, AUTHGATE_CACHE_TTL="forever")
    proc = subprocess.run(
        [sys.executable, "-m", "authgate", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AUTHGATE_CACHE_TTL" in lines[0]


def test_serve_reports_a_busy_port(redis_url: str) -> None:
    """A listener that cannot bind stops start-up with a message naming it."""
    import socket

    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        env = base_env(
            redis_url,
            AUTHGATE_LISTEN=f"127.0.0.1:{port}",
            AUTHGATE_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        )
        proc = subprocess.run(
            [sys.executable, "-m", "authgate", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert "AUTHGATE_LISTEN" in proc.stderr and "Traceback" not in proc.stderr


def test_config_check(redis_url: str) -> None:
    """`authgate config check` validates, reaches Redis, and never prints the pepper."""
    proc = subprocess.run(
        [sys.executable, "-m", "authgate", "config", "check"],
        env=base_env(redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout and PEPPER not in proc.stdout
    down = subprocess.run(
        [sys.executable, "-m", "authgate", "config", "check"],
        env=base_env("redis://127.0.0.1:1/0"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and "Redis is unavailable" in down.stderr
