"""Settings, loaded once from `AUTHGATE_*` variables and an optional TOML file.

Environment variables win over the file; every error names the setting at fault.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .durations import parse_duration
from .errors import ConfigError
from .rules import Reading, parse_reading

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
DEFAULT_SOURCES = ("header:X-Power-Token", "query:pwt")
ROUTE_CLASSES = ("scoped", "system", "app", "default")
_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,23}_$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class Secret:
    """A value that never shows itself in `repr` or `str`."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a token may be read: `header:NAME`, `query:NAME` or `bearer`."""

    kind: Literal["header", "query", "bearer"]
    name: str  # lower-case header name, query parameter name, or "authorization"

    @property
    def label(self) -> str:
        return "bearer" if self.kind == "bearer" else f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class Route:
    """A path prefix (whole segments; `{org}`, `{project}`, `{app}` match one) and its rule.

    `area`: for a scoped or app route, the prefix of the protected area it covers; a path
    inside it that no route matches is refused (SCOPE_MISMATCH) rather than judged as
    `default`. By default the route's literal prefix without a trailing version segment
    (`/minimal/api/rest/v1/{org}/{project}` covers `/minimal/api/rest`); None for none."""

    cls: str
    prefix: str
    segments: tuple[str, ...]
    permissions: frozenset[str] = frozenset()
    area: str | None = None


def _default_routes() -> tuple[Route, ...]:
    return (
        make_route("scoped", "/minimal/api/rest/v1/{org}/{project}", ()),
        make_route("system", "/minimal/api/system", ()),
        make_route("app", "/minimal/rest/apps/v1", ()),
    )


@dataclass(frozen=True, slots=True)
class Settings:
    pepper: Secret
    redis_url: str = "redis://127.0.0.1:6379/0"
    token_prefix: str = "min_"
    token_sources: tuple[TokenSource, ...] = ()
    token_mode: Literal["both", "any"] = "both"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    routes: tuple[Route, ...] = field(default_factory=_default_routes)
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    metrics_listen: tuple[str, int] = ("127.0.0.1", 9180)
    admin_listen: tuple[str, int] | None = None
    workers: int = 1
    cache_ttl: float = 30.0
    cache_size: int = 200_000
    negative_cache_ttl: float = 5.0
    negative_cache_size: int = 100_000
    stale_window: float = 60.0
    redis_timeout: float = 0.25
    audit_maxlen: int = 100_000
    admin_audit_burst: int = 100  # audit events one management caller may write at once
    admin_audit_rate: int = 10  # … and per second after that (per worker)
    usage_flush_interval: float = 1.0
    key_prefix: str = "authgate"
    metrics_dir: str | None = None
    log_level: str = "info"
    max_token_length: int = 256
    trusted_hops: int = 1  # X-Forwarded-For entries, from the right, the proxies vouch for
    reading: Reading = field(default_factory=Reading)  # the request-reading rules (rules.py)

    @property
    def environment(self) -> str:
        return "test" if "test" in self.token_prefix else "live"


def parse_listen(name: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT (example: 127.0.0.1:8080)")
    return host, int(port)


def parse_source(name: str, text: str) -> TokenSource:
    text = text.strip()
    if text.lower() == "bearer":
        return TokenSource("bearer", "authorization")
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    value = value.strip()
    if sep and kind == "header" and _HEADER_NAME.match(value):
        if value.lower() == "authorization":
            raise ConfigError(f"{name}: use 'bearer' for the Authorization header")
        return TokenSource("header", value.lower())
    if sep and kind == "query" and _QUERY_NAME.match(value):
        return TokenSource("query", value)
    raise ConfigError(f"{name}: {text!r} is not a token source (header:NAME, query:NAME or bearer)")


_VERSION = re.compile(r"^v[0-9]+$")


def default_area(cls: str, segments: tuple[str, ...]) -> str | None:
    """A scoped or app route's protected area: its segments before the first placeholder,
    without a last one that names a version (`v1`), so every version is covered."""
    if cls not in ("scoped", "app"):
        return None
    literal: list[str] = []
    for seg in segments:
        if seg.startswith("{"):
            break
        literal.append(seg)
    if len(literal) > 1 and _VERSION.match(literal[-1]):
        literal.pop()
    return "/" + "/".join(literal) if literal else None


def make_route(
    cls: str, prefix: str, permissions: Any, where: str = "routes", area: Any = ...
) -> Route:
    if cls not in ROUTE_CLASSES:
        raise ConfigError(f"{where}.class: {cls!r} is not one of {', '.join(ROUTE_CLASSES)}")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ConfigError(f"{where}.prefix: {prefix!r} must be a path starting with '/'")
    segments = tuple(s for s in prefix.split("/") if s)
    for i, seg in enumerate(segments):
        if seg.startswith("{") and seg not in ("{org}", "{project}", "{app}"):
            raise ConfigError(
                f"{where}.prefix: unknown placeholder {seg} (use {{org}}, {{project}} or {{app}})"
            )
        if seg.startswith("{") and seg in segments[:i]:
            raise ConfigError(f"{where}.prefix: placeholder {seg} appears more than once")
    if cls == "scoped" and not {"{org}", "{project}"} <= set(segments):
        raise ConfigError(f"{where}.prefix: a scoped route needs {{org}} and {{project}}")
    if not isinstance(permissions, list | tuple) or not all(
        isinstance(p, str) and p for p in permissions
    ):
        raise ConfigError(f"{where}.permissions: must be a list of scope strings")
    if area is ...:
        area = default_area(cls, segments)
    elif area is False or area == "":
        area = None
    elif not isinstance(area, str) or not area.startswith("/"):
        raise ConfigError(f"{where}.area: {area!r} must be a path starting with '/', or false")
    elif cls not in ("scoped", "app"):
        raise ConfigError(f"{where}.area: only a scoped or app route covers an area")
    else:
        area = "/" + "/".join(s for s in area.split("/") if s)
    return Route(cls, prefix, segments, frozenset(permissions), area)


def _networks(name: str, values: Any) -> tuple[IPNetwork, ...]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    if not isinstance(values, list | tuple):
        raise ConfigError(f"{name}: must be a list of addresses or CIDRs")
    try:
        return tuple(ipaddress.ip_network(str(v).strip(), strict=False) for v in values)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"AUTHGATE_CONFIG: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"AUTHGATE_CONFIG: {path} is not valid TOML: {exc}") from None


_KEYS: dict[str, str] = {
    # setting name -> kind
    "redis_url": "str",
    "token_prefix": "str",
    "token_sources": "sources",
    "token_mode": "mode",
    "trusted_proxies": "networks",
    "trusted_hops": "int",
    "listen": "listen",
    "metrics_listen": "listen",
    "admin_listen": "listen",
    "workers": "int",
    "cache_ttl": "duration",
    "cache_size": "int",
    "negative_cache_ttl": "duration",
    "negative_cache_size": "int",
    "stale_window": "duration",
    "redis_timeout": "duration",
    "audit_maxlen": "int",
    "admin_audit_burst": "int",
    "admin_audit_rate": "int",
    "usage_flush_interval": "duration",
    "key_prefix": "str",
    "metrics_dir": "str",
    "log_level": "level",
}


def _convert(name: str, kind: str, raw: Any) -> Any:
    if kind == "str":
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{name}: must be a non-empty string")
        return raw
    if kind == "int":
        if isinstance(raw, str) and raw.strip().isdigit():
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
            raise ConfigError(f"{name}: must be a positive whole number, got {raw!r}")
        return raw
    if kind == "duration":
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise ConfigError(f"{name}: must be a duration such as 30s, got {raw!r}")
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if kind == "listen":
        if not isinstance(raw, str):
            raise ConfigError(f"{name}: must be HOST:PORT")
        return parse_listen(name, raw)
    if kind == "networks":
        return _networks(name, raw)
    if kind == "sources":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple) or not items:
            raise ConfigError(f"{name}: must list at least one token source")
        sources = tuple(parse_source(name, str(i)) for i in items if str(i).strip())
        if not sources or len({s.label for s in sources}) != len(sources):
            raise ConfigError(f"{name}: must list distinct token sources")
        return sources
    if kind == "mode":
        if raw not in ("both", "any"):
            raise ConfigError(f"{name}: must be 'both' or 'any', got {raw!r}")
        return raw
    if kind == "level":
        if not isinstance(raw, str) or raw.lower() not in (
            "critical",
            "error",
            "warning",
            "info",
            "debug",
        ):
            raise ConfigError(f"{name}: must be one of critical, error, warning, info, debug")
        return raw.lower()
    raise AssertionError(kind)  # pragma: no cover


def _pepper(environ: Mapping[str, str]) -> Secret:
    value = environ.get("AUTHGATE_PEPPER")
    path = environ.get("AUTHGATE_PEPPER_FILE")
    if value and path:
        raise ConfigError("AUTHGATE_PEPPER: set either AUTHGATE_PEPPER or AUTHGATE_PEPPER_FILE")
    name = "AUTHGATE_PEPPER"
    if path:
        name = "AUTHGATE_PEPPER_FILE"
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(
            "AUTHGATE_PEPPER: required (a random secret of at least 32 characters; "
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    if len(value.encode()) < 32:
        raise ConfigError(f"{name}: the pepper must be at least 32 characters long")
    return Secret(value.encode())


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: os.environ) and the file it names."""
    env = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    config_path = env.get("AUTHGATE_CONFIG")
    if config_path:
        file_values = _read_file(config_path)
    values: dict[str, Any] = {}
    for key, raw in file_values.items():
        if key in ("routes", "reading"):
            continue
        if key not in _KEYS:
            raise ConfigError(f"AUTHGATE_CONFIG: unknown setting {key!r}")
        values[key] = _convert(f"{key} (in {config_path})", _KEYS[key], raw)
    for key, kind in _KEYS.items():
        var = f"AUTHGATE_{key.upper()}"
        if var in env and env[var] != "":
            values[key] = _convert(var, kind, env[var])
    if "routes" in file_values:
        routes = file_values["routes"]
        if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
            raise ConfigError("routes: must be an array of tables ([[routes]])")
        built = []
        for i, r in enumerate(routes):
            where = f"routes[{i}]"
            unknown = set(r) - {"class", "prefix", "permissions", "area"}
            if unknown:
                raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            built.append(
                make_route(
                    r.get("class", "default"),
                    r.get("prefix"),
                    r.get("permissions", []),
                    where,
                    r.get("area", ...),
                )
            )
        values["routes"] = tuple(built)
    if "reading" in file_values:
        values["reading"] = parse_reading(f"reading (in {config_path})", file_values["reading"])
    prefix = values.get("token_prefix", "min_")
    if not _PREFIX.match(prefix):
        raise ConfigError(
            f"AUTHGATE_TOKEN_PREFIX: {prefix!r} must be lower-case letters, digits and '_', "
            "ending in '_' (examples: min_, ak_live_)"
        )
    values.setdefault("token_sources", tuple(parse_source("default", s) for s in DEFAULT_SOURCES))
    values.setdefault("trusted_proxies", _networks("default", list(DEFAULT_TRUSTED)))
    if values.get("token_mode", "both") == "both" and len(values["token_sources"]) < 2:
        raise ConfigError("AUTHGATE_TOKEN_MODE: 'both' needs at least two token sources")
    return Settings(pepper=_pepper(env), **values)
