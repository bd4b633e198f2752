"""The nginx examples in README.md (and docs/deploy.md) run as copied.

Each ```nginx block is written as nginx.conf beside a copy of deploy/nginx/authgate, passes
`nginx -t` with the real nginx, and then serves a real request: through it to a real
`authgate serve` and an echo upstream, which must get the client's Host, the identity
headers and no token. Only the addresses are changed, to free loopback ports. A fragment
(no top-level `http {}`) cannot run alone and is skipped, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AuthgateProcess, free_port, run_cli, start_authgate
from tests.echo_upstream import EchoUpstream
from tests.nginx_harness import nginx_binary, wait_for_listen

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("README.md", "docs/deploy.md")
SPEC = ["--name", "r", "--org", "acme", "--project", "tunes", "--key-type", "r--", "--json"]


def nginx_blocks() -> list[object]:
    params: list[object] = []
    for name in SOURCES:
        text = (ROOT / name).read_text()
        for i, block in enumerate(re.findall(r"^```nginx\n(.*?)^```", text, re.M | re.S)):
            params.append(pytest.param(block, id=f"{name}#{i + 1}"))
    return params


BLOCKS = nginx_blocks()


@pytest.fixture(scope="module")
def served(valkey: object) -> Iterator[tuple[AuthgateProcess, EchoUpstream, str]]:
    from tests.conftest import base_env

    env = base_env(valkey.url)  # type: ignore[attr-defined]
    token = json.loads(run_cli(env, "token", "create", *SPEC).stdout)["token"]
    ag = start_authgate(env)
    echo = EchoUpstream().start()
    yield ag, echo, token
    echo.stop()
    ag.stop()


def runnable(block: str, workdir: Path, authgate_port: int, api_port: int) -> tuple[Path, int]:
    """The block as nginx.conf in `workdir`, the snippets beside it; its addresses moved."""
    shutil.copytree(ROOT / "deploy" / "nginx" / "authgate", workdir / "authgate")
    upstream = workdir / "authgate" / "upstream.conf"
    upstream.write_text(upstream.read_text().replace(":8080;", f":{authgate_port};"))
    listen = re.search(r"^\s*listen\s+(\d+)\s*;", block, re.M)
    assert listen, "the block has no plain `listen PORT;` (TLS needs certificates to run)"
    port = free_port()
    conf = block.replace(
        listen.group(0), listen.group(0).replace(listen.group(1), f"127.0.0.1:{port}")
    )
    conf = re.sub(r"server 127\.0\.0\.1:9000;", f"server 127.0.0.1:{api_port};", conf)
    (workdir / "nginx.conf").write_text(conf)
    (workdir / "logs").mkdir()
    return workdir / "nginx.conf", port


@pytest.mark.nginx
@pytest.mark.parametrize(
    "block",
    BLOCKS
    or [
        pytest.param(
            "",
            marks=pytest.mark.skip(
                reason="README.md and docs/deploy.md have no ```nginx block yet"
            ),
        )
    ],
)
def test_nginx_block_runs_as_copied(
    block: str, tmp_path: Path, served: tuple[AuthgateProcess, EchoUpstream, str]
) -> None:
    """The block passes `nginx -t`; a request with a token reaches the API with the client's
    Host and authgate's identity and without the token; one without a token gets 401 JSON."""
    if not re.search(r"^http\s*\{", block, re.M):
        pytest.skip("a fragment (no http {} block): only complete configurations can run")
    ag, echo, token = served
    conf, port = runnable(block, tmp_path, ag.port, echo.port)
    nginx = str(nginx_binary())
    base = [nginx, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")]
    checked = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(
        [*base, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_listen(port, proc)
        url = f"http://127.0.0.1:{port}/minimal/api/rest/v1/acme/tunes/items?pwt={token}&a=1"
        r = httpx.get(url, headers={"X-Power-Token": token, "Host": "api.example.com"})
        assert r.status_code == 200, r.text
        seen = echo.received[-1]
        headers = {k.lower(): v for k, v in seen["headers"]}
        assert headers["host"] == "api.example.com"
        assert headers["x-org-id"] == "acme" and headers["x-project-id"] == "tunes"
        assert "x-power-token" not in headers and token not in seen["target"]
        assert seen["target"] == "/minimal/api/rest/v1/acme/tunes/items?a=1"
        denied = httpx.get(url.split("?")[0])
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "TOKEN_MISSING"
    finally:
        proc.terminate()
        proc.wait(10)
