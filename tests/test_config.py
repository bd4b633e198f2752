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


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        pytest.param("redis:/127.0.0.1:6411/0", "is not a URL", id="one-slash"),
        pytest.param("127.0.0.1:6379", "is not a URL", id="no-scheme"),
        pytest.param("redis://127.0.0.1:6411/abc", "not a database number", id="db-word"),
        pytest.param("redis://127.0.0.1:6411/-1", "not a database number", id="db-negative"),
        pytest.param("redis://127.0.0.1:6411/0/1", "not a database number", id="db-path"),
        pytest.param("redis://h:99999/0", "bad port", id="port-range"),
        pytest.param("redis://h:x/0", "bad port", id="port-word"),
        pytest.param("redis://", "needs a host", id="no-host"),
        pytest.param("redis://a:1,b:2/0", "one host only", id="two-hosts"),
        pytest.param("unix:///run/r.sock?db=x", "not a database number", id="unix-db"),
        pytest.param("redis+sentinel://h:26379/mymaster/x", "not a database", id="sentinel-db"),
        pytest.param("redis+cluster://h:7000/3", "no database", id="cluster-db"),
        pytest.param("http://h:80/", "unsupported scheme", id="http"),
    ],
)
def test_malformed_redis_urls_are_refused_naming_the_variable(url: str, needle: str) -> None:
    """A Redis URL redis-py would misread (`redis:/host` dials localhost:6379, `/abc` is
    taken as database 0) is refused at load with one line naming AUTHGATE_REDIS_URL."""
    with pytest.raises(ConfigError) as exc:
        load_settings({**GOOD, "AUTHGATE_REDIS_URL": url})
    message = str(exc.value)
    assert message.startswith("AUTHGATE_REDIS_URL: ") and needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:secret@redis:6379/15",
        "rediss://redis.example.com",
        "unix:///run/redis.sock?db=2",
        "redis+sentinel://a:26379,b:26379/mymaster/1",
        "redis+cluster://a:7000,b:7001",
    ],
)
def test_well_formed_redis_urls_load(url: str) -> None:
    """Every documented URL form loads."""
    assert load_settings({**GOOD, "AUTHGATE_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(
    ("source", "value"),
    [
        pytest.param("env", "30", id="env-integer"),
        pytest.param("env", "2.5", id="env-decimal"),
        pytest.param("file", "30", id="file-number"),
        pytest.param("file", '"30"', id="file-string"),
    ],
)
def test_durations_without_a_unit_are_refused_with_a_hint(source: str, value: str) -> None:
    """`AUTHGATE_CACHE_TTL=30` (or `cache_ttl = 30` in the file) is refused with the unit
    to add, instead of meaning 30 seconds silently."""
    if source == "env":
        env = {**GOOD, "AUTHGATE_CACHE_TTL": value}
    else:
        env = {**GOOD, "AUTHGATE_CONFIG": toml(f"cache_ttl = {value}\n")}
    with pytest.raises(ConfigError) as exc:
        load_settings(env)
    number = value.strip('"')
    assert f"needs a unit, e.g. {number}s" in str(exc.value)
    assert "cache_ttl" in str(exc.value).lower()


def test_log_format_and_previous_pepper_settings() -> None:
    """AUTHGATE_LOG_FORMAT takes json or text; AUTHGATE_PEPPER_PREVIOUS (or _FILE) is a
    masked secret that must differ from the pepper."""
    s = load_settings({**GOOD, "AUTHGATE_LOG_FORMAT": "json", "AUTHGATE_PEPPER_PREVIOUS": "p" * 40})
    assert s.log_format == "json" and s.pepper_previous is not None
    assert "p" * 40 not in repr(s)
    assert load_settings(GOOD).pepper_previous is None and load_settings(GOOD).log_format == "text"
    for env, needle in (
        ({"AUTHGATE_LOG_FORMAT": "xml"}, "AUTHGATE_LOG_FORMAT"),
        ({"AUTHGATE_PEPPER_PREVIOUS": PEPPER}, "same as AUTHGATE_PEPPER"),
        ({"AUTHGATE_PEPPER_PREVIOUS": "short"}, "AUTHGATE_PEPPER_PREVIOUS"),
    ):
        with pytest.raises(ConfigError, match=needle):
            load_settings({**GOOD, **env})
