"""The `authgate` command. Only this module exits; everything below it raises."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

import orjson

from . import __version__, tokens
from .errors import BackendUnavailable, ConfigError, InvalidInput, NotFound
from .manage import LIST_STATUSES
from .model import (
    ATTRIBUTE_TABLE,
    BY_NAME,
    MAX_EXPIRY,
    PATCHABLE,
    Attribute,
    duration,
    parse_time,
    validate_patch,
)
from .store import HISTORY_DAYS, MAX_GRACE

# Options whose values may start with '-' (key types are written `-w-`, `--d`).
_DASH_VALUES = ("--key-type",)
DISPLAY = (  # what `token show` prints, in this order; empty values are left out
    "id", "display_prefix", "name", "description", "status", "enabled", "kind", "key_type",
    "roles", "org", "project", "space", "feature", "user_id", "permissions", "ip_allowlist",
    "app_ids", "environment", "created_at", "created_by", "updated_at", "updated_by",
    "expires_at", "revoked_at", "rotated_from", "rotated_to", "last_used_at",
    "last_client_ip", "request_count",
)  # fmt: skip


def _fix_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _DASH_VALUES and i + 1 < len(argv):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _duration(field: str, most: float) -> Callable[[str], float]:
    """An argparse type: a duration that carries its unit (`--grace 24` is refused)."""

    def parse(text: str) -> float:
        try:
            return duration(field, text, most=most)
        except InvalidInput as exc:
            hint = "" if "unit" in exc.message else " (30s, 15m, 24h, 30d)"
            raise argparse.ArgumentTypeError(exc.message + hint) from None

    return parse


def _time(text: str) -> str:
    try:
        parse_time("expires_at", text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def _token_id(text: str) -> str:
    """A token id argument; a display prefix or a token value is told what an id is."""
    if tokens.looks_like_id(text):
        return text
    if text.startswith("tok_"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a token id (tok_ + 26 characters)")
    raise argparse.ArgumentTypeError(
        "a token id starts with tok_ (a display prefix such as min_8Hoi or a token value is "
        "not an id; `authgate token list` shows the ids)"
    )


def _add_attribute(parser: argparse.ArgumentParser, attr: Attribute, *, update: bool) -> None:
    """A CLI option for one attribute, from the attribute table."""
    dest = attr.name
    if attr.kind == "list":
        what = "comma list, repeatable" + ("; replaces the list, '' empties it" if update else "")
        parser.add_argument(attr.flag, dest=dest, action="append", default=None,
                            help=f"{attr.help} ({what})")  # fmt: skip
    elif attr.kind == "time":
        parser.add_argument(attr.flag, dest=dest, type=_time, default=None,
                            help="ISO 8601 with a zone, e.g. 2027-01-31T00:00:00Z")  # fmt: skip
    elif attr.kind == "choice":
        metavar = attr.name.upper()
        parser.add_argument(attr.flag, dest=dest, required=attr.required and not update,
                            metavar=metavar, default=None,
                            help=f"{attr.help} ({', '.join(attr.choices)})")  # fmt: skip
    elif attr.kind == "bool":
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--enable", dest=dest, action="store_const", const=True,
                           default=None, help="enable the token again")  # fmt: skip
        group.add_argument("--disable", dest=dest, action="store_const", const=False,
                           help="refuse the token (TOKEN_DISABLED) until enabled")  # fmt: skip
    else:
        parser.add_argument(attr.flag, dest=dest, required=attr.required and not update,
                            default=None, help=attr.help)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="authgate",
        description="API-token authorization sidecar for nginx auth_request.",
    )
    p.add_argument("--version", action="version", version=f"authgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the data plane (and the management API if enabled)")
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: AUTHGATE_WORKERS or 1)",
    )

    t = sub.add_parser(
        "token", help="create, list, show, update, rotate, revoke, delete tokens; usage"
    )
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="create a token and print it once")
    for attr in ATTRIBUTE_TABLE:
        if attr.create:
            _add_attribute(c, attr, update=False)
    c.add_argument("--expires-in", type=_duration("expires_in", MAX_EXPIRY), default=None,
                   help="a duration with a unit: 12h, 30d")  # fmt: skip
    c.add_argument("--json", action="store_true", help="print one JSON object")

    u = tsub.add_parser("update", help="change a token's patchable attributes")
    u.add_argument("id", type=_token_id)
    for attr in ATTRIBUTE_TABLE:
        if attr.patch:
            _add_attribute(u, attr, update=True)
    expiry = u.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=_duration("expires_in", MAX_EXPIRY), default=None,
                        help="a duration with a unit from now: 12h, 30d")  # fmt: skip
    expiry.add_argument("--no-expiry", action="store_true", help="never expire")
    u.add_argument("--json", action="store_true")

    ls = tsub.add_parser("list", help="list tokens, newest first (never shows secrets)")
    ls.add_argument("--org")
    ls.add_argument("--project")
    ls.add_argument("--status", choices=LIST_STATUSES)
    ls.add_argument("--name", help="names starting with this (any case)")
    ls.add_argument("--json", action="store_true", help="print one JSON array of every token")
    for name, helptext in (
        ("show", "show one token"),
        ("revoke", "revoke now"),
        ("delete", "delete for good"),
    ):
        x = tsub.add_parser(name, help=helptext)
        x.add_argument("id", type=_token_id)
        x.add_argument("--json", action="store_true")
    r = tsub.add_parser("rotate", help="issue a new token; the old one works for --grace")
    r.add_argument("id", type=_token_id)
    r.add_argument("--grace", type=_duration("grace", MAX_GRACE), default=0.0,
                   help="a duration with a unit, e.g. 24h (default 0s)")  # fmt: skip
    r.add_argument("--json", action="store_true")
    us = tsub.add_parser("usage", help="requests per UTC day: allowed, denied by code")
    us.add_argument("id", type=_token_id)
    us.add_argument("--days", type=int, default=30, help=f"1 to {HISTORY_DAYS} (default 30)")
    us.add_argument("--json", action="store_true")

    a = sub.add_parser("audit", help="read the audit stream, newest first")
    a.add_argument("--count", type=int, default=50)
    a.add_argument("--json", action="store_true")

    e = sub.add_parser("explain", help="why a token is allowed or denied on METHOD URI")
    e.add_argument("--method", default="GET")
    e.add_argument("--uri", required=True, help="the original URI, e.g. /minimal/api/...")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="the token value ('-' reads it from standard input)")
    who.add_argument("--id", help="a token id (skips the checks on the value itself)")
    e.add_argument("--ip", default=None, help="client address to check allowlists against")
    e.add_argument("--json", action="store_true")

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="action", required=True, metavar="ACTION")
    ck = csub.add_parser("check", help="validate configuration and reach Redis")
    ck.add_argument("--offline", action="store_true", help="do not contact Redis")

    pep = sub.add_parser("pepper", help="pepper rotation (AUTHGATE_PEPPER_PREVIOUS)")
    psub = pep.add_subparsers(dest="action", required=True, metavar="ACTION")
    rk = psub.add_parser("rekey", help="begin re-keying tokens to the new pepper, or report")
    rk.add_argument("--json", action="store_true")
    return p


def _flat(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _print(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _human_token(view: dict[str, Any]) -> None:
    for key in DISPLAY:
        value = view.get(key)
        if value in (None, "", []) or (key == "enabled" and value is True):
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key + ':':16} {value}")


def _shown_once(token: str) -> None:
    print(f"token:           {token}")
    print("                 (shown once: store it now, it cannot be retrieved later)")


async def _with_store(fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    from .backend import connect
    from .config import load_settings
    from .store import TokenStore

    settings = load_settings()
    from .preflight import check

    redis = connect(settings.redis_url, max(settings.redis_timeout, 2.0))
    try:
        await check(redis, settings, store=False)  # Redis is Redis and holds this pepper
        result = await fn(TokenStore(redis, settings))
        await check(redis, settings)  # first use: the command succeeded, store the pepper's
        return result
    finally:
        await redis.aclose()


def _spec(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The attributes given on the command line (lists flattened, unset ones left out)."""
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        out[name] = _flat(value) if BY_NAME[name].kind == "list" else value
    return out


async def _all_tokens(store: Any, filters: dict[str, str]) -> list[dict[str, Any]]:
    """Every token matching `filters`, newest first, a page at a time."""
    from .manage import check_filters, matcher

    matches = matcher(check_filters(filters), time.time())
    out: list[dict[str, Any]] = []
    position = None
    while True:
        page, position = await store.page(after=position, limit=500, keep=matches)
        out.extend(page)
        if position is None:
            return out


def _when(value: str | None) -> str:
    return "never" if value is None else value[:16].replace("T", " ")


def cmd_token(args: argparse.Namespace) -> int:
    action = args.action
    if action == "create":
        spec = _spec(args, [a.name for a in ATTRIBUTE_TABLE if a.create])
        if args.expires_in is not None:
            spec["expires_in"] = args.expires_in
        token, view = asyncio.run(_with_store(lambda s: s.create(spec, _actor())))
        if args.json:
            _print({"token": token, **view})
        else:
            _shown_once(token)
            _human_token(view)
        return 0
    if action == "update":
        patch = _spec(args, list(PATCHABLE))
        if args.expires_in is not None:
            patch["expires_in"] = args.expires_in
        if args.no_expiry:
            if "expires_at" in patch:
                raise InvalidInput("--no-expiry", "give --no-expiry or --expires-at, not both")
            patch["expires_at"] = None
        changes = validate_patch(patch)
        view = asyncio.run(_with_store(lambda s: s.update(args.id, changes, _actor())))
        if args.json:
            _print(view)
        else:
            print(f"updated {view['id']} ({view['display_prefix']})")
            _human_token(view)
        return 0
    if action == "list":
        filters = {k: getattr(args, k) for k in ("org", "project", "status", "name")}
        rows = asyncio.run(_with_store(lambda s: _all_tokens(s, filters)))
        if args.json:
            _print(rows)
        else:
            print(
                f"{'ID':30}  {'PREFIX':12} {'STATUS':9} {'EXPIRES':16}  {'TYPE':4} "
                f"{'ORG/PROJECT':24} NAME"
            )
            for v in rows:
                scope = f"{v['org']}/{v['project']}"
                status = v["status"] + ("*" if v.get("rotated_to") else "")
                print(
                    f"{v['id']:30}  {v['display_prefix']:12} {status:9} "
                    f"{_when(v['expires_at']):16}  {v['key_type']:4} {scope:24} {v['name']}"
                )
            if any(v.get("rotated_to") for v in rows):
                print("* rotated: works until its expiry (the grace period), then expires")
        return 0
    if action == "rotate":
        token, view = asyncio.run(_with_store(lambda s: s.rotate(args.id, args.grace, _actor())))
        if args.json:
            _print({"token": token, **view})
        else:
            _shown_once(token)
            print(f"{args.id} keeps working for {args.grace:g}s, then expires.")
            _human_token(view)
        return 0
    if action == "usage":
        if not 1 <= args.days <= HISTORY_DAYS:
            raise InvalidInput("--days", f"must be a whole number from 1 to {HISTORY_DAYS}")

        async def usage(store: Any) -> dict[str, Any]:
            await store.load(args.id)  # NotFound for an unknown id
            return {"id": args.id, "days": await store.usage_history(args.id, args.days)}

        result = asyncio.run(_with_store(usage))
        if args.json:
            _print(result)
        else:
            print(f"{'DATE':10}  {'ALLOWED':>8}  {'DENIED':>7}  {'LAST CLIENT':16} BY CODE")
            for day in result["days"]:
                denied = sum(day["denied"].values())
                codes = ", ".join(f"{c} {n}" for c, n in day["denied"].items())
                print(
                    f"{day['date']:10}  {day['allowed']:>8}  {denied:>7}  "
                    f"{day['last_client_ip'] or '-':16} {codes}"
                )
        return 0
    op = {
        "show": lambda s: s.show(args.id),
        "revoke": lambda s: s.revoke(args.id, _actor()),
        "delete": lambda s: s.delete(args.id, _actor()),
    }[action]
    view = asyncio.run(_with_store(op))
    if args.json:
        _print(view)
    else:
        if action != "show":
            print(f"{action}d {view['id']} ({view['display_prefix']})")
        _human_token(view)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    events = asyncio.run(_with_store(lambda s: s.audit_events(max(1, min(args.count, 10000)))))
    if args.json:
        _print(events)
    else:
        for ev in events:
            detail = orjson.dumps(ev["detail"]).decode() if ev["detail"] else ""
            print(
                f"{ev['time']}  {ev['action']:8} {ev['token_id'] or '-':30} "
                f"{ev['display_prefix'] or '':12} {ev['actor']} {detail}"
            )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    token = args.token
    if token == "-":
        token = sys.stdin.readline().strip()
    if args.ip is not None:
        try:
            ipaddress.ip_address(args.ip)
        except ValueError:
            raise InvalidInput("--ip", f"{args.ip!r} is not an IP address") from None
    result = asyncio.run(
        _with_store(
            lambda s: explain(
                s, method=args.method, uri=args.uri, token=token, token_id=args.id, ip=args.ip
            )
        )
    )
    if args.json:
        _print(result)
    else:
        verdict = "ALLOW" if result["status"] == 200 else "DENY"
        print(f"{verdict} {result['status']} {result['code']}")
        print(f"  decided by: {result['reason']}")
        for key in ("token_id", "route", "path", "client_ip"):
            if result.get(key):
                print(f"  {key}: {result[key]}")
        if result.get("details"):
            print(f"  details: {orjson.dumps(result['details']).decode()}")
    return 0 if result["status"] == 200 else 3


def cmd_config(args: argparse.Namespace) -> int:
    from .config import load_settings

    settings = load_settings()
    print(f"token prefix:    {settings.token_prefix} (environment {settings.environment})")
    print(
        f"token sources:   {', '.join(s.label for s in settings.token_sources)} "
        f"(mode {settings.token_mode})"
    )
    print(f"listen:          {settings.listen[0]}:{settings.listen[1]}")
    print(f"metrics:         {settings.metrics_listen[0]}:{settings.metrics_listen[1]}")
    admin = settings.admin_listen
    print(f"admin API:       {f'{admin[0]}:{admin[1]}' if admin else 'off'}")
    print("routes:")
    for route in settings.routes:
        perms = f" permissions={','.join(sorted(route.permissions))}" if route.permissions else ""
        print(f"  {route.cls:8} {route.prefix}{perms}")
    from .backend import parse_redis_url

    target = parse_redis_url(settings.redis_url)
    print(f"redis:           {target.safe_url} ({target.kind})")
    if not args.offline:

        async def ping(store: Any) -> None:
            from .backend import mapped_errors

            async with mapped_errors():
                await store.redis.ping()

        asyncio.run(_with_store(ping))
        print("redis reachable: yes")
        print("pepper:          matches the fingerprint stored in Redis")
    print("configuration OK")
    return 0


def cmd_pepper(args: argparse.Namespace) -> int:
    from .pepper import rekey

    progress = asyncio.run(_with_store(rekey))
    if args.json:
        _print(
            {
                "started": progress.started,
                "total": progress.total,
                "pending": progress.pending,
                "active_pending": progress.active,
                "done": progress.done,
            }
        )
        return 0
    if progress.started:
        print(f"re-keying begun: {progress.total} token(s) are re-keyed to the new pepper on use")
    left = progress.total - len(progress.pending)
    print(f"re-keyed or gone: {left} of {progress.total}; active and pending: {progress.active}")
    for row in [r for r in progress.pending if r["status"] == "active"][:20]:
        print(f"  pending  {row['id']}  {row['display_prefix']}")
    if progress.done:
        print("no active token needs the old pepper: unset AUTHGATE_PEPPER_PREVIOUS and restart")
    else:
        print("keep AUTHGATE_PEPPER_PREVIOUS until these are used once (or revoke them)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs
    from .config import load_settings
    from .server import serve

    global _log_format
    # Before the settings load, so that even a configuration error is one line in the format.
    _log_format = os.environ.get("AUTHGATE_LOG_FORMAT", "text")
    logs.configure(_log_format)
    settings = load_settings()
    workers = args.workers if args.workers is not None else settings.workers
    if workers < 1:
        raise ConfigError("--workers: must be at least 1")
    logs.configure(settings.log_format, settings.log_level)
    serve(settings, workers)
    return 0


_log_format = "text"  # what `fail` writes: `serve` sets it from AUTHGATE_LOG_FORMAT


def fail(message: str, code: int) -> NoReturn:
    from .logs import fatal_line

    sys.stderr.write(fatal_line(f"authgate: {message}", _log_format))
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _fix_dash_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(args_list)
    handlers = {
        "serve": cmd_serve,
        "token": cmd_token,
        "audit": cmd_audit,
        "explain": cmd_explain,
        "config": cmd_config,
        "pepper": cmd_pepper,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)
    except InvalidInput as exc:
        fail(f"invalid input: {exc}", 2)
    except NotFound as exc:
        fail(f"no token with id {exc}", 1)
    except BackendUnavailable as exc:
        fail(f"Redis is unavailable ({exc}); the command did not complete", 1)
    except KeyboardInterrupt:
        return 130
