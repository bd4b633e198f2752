"""The request-reading rules, each declared once with its default and its help.

authgate judges a request as every common upstream would read it, or refuses it (400
BAD_REQUEST). Each rule below is on by default; the config file's `[reading]` table turns
one off (`path_parameters = false`) when every upstream behind the proxy is known to read
that spelling the way authgate does. docs/request-reading.md says which upstreams need
which rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    help: str


RULES: tuple[Rule, ...] = (
    Rule(
        "path_parameters",
        "Refuse a ';' in a path segment, raw or decoded (`system;x`, `..;`): servlet "
        "containers (Tomcat, Jetty) cut `;…` from each segment and read `..;` as `..`.",
    ),
    Rule(
        "backslashes",
        "Refuse a raw or encoded backslash: IIS and other Windows upstreams read it as '/'.",
    ),
    Rule(
        "trailing_dots",
        "Refuse a segment ending in a dot or a space (`system.`, `system%20`): Windows "
        "upstreams drop them and serve `system`.",
    ),
    Rule(
        "case_variants",
        "Refuse a path that matches a route's prefix (or a protected area) only when letter "
        "case is ignored (`/minimal/api/SYSTEM`): Express by default, ASP.NET Core and IIS "
        "route case-insensitively.",
    ),
    Rule(
        "double_encoding",
        "Refuse an encoded '%' in the path (`%2573`): an upstream that decodes the path "
        "again reads another one (`%73`, then `s`).",
    ),
    Rule(
        "query_spellings",
        "Refuse a query name that a common parser reads as `app_id` or a token parameter "
        "without being spelled exactly so: letter case (`APP_ID`, `PWT`: ASP.NET), '.', '+', "
        "' ', '-' or '[' for '_' and a `[…]` suffix (`app.id`, `app_id[]`: PHP, Rails), "
        "percent-encoded letters, and such a name after a ';' (`x=1;app_id=…`: parsers that "
        "split pairs on ';').",
    ),
    Rule(
        "raw_path",
        "Where the proxy forwards the client's raw path (ingress-nginx, Traefik, Caddy, "
        "Envoy, NGINX Gateway Fabric), refuse a raw path that is not already in the normal "
        "form authgate judges: dot segments, repeated slashes, encoded '/', '\\', '.' or "
        "unreserved characters (`%2F`, `%2e`, `%73`).",
    ),
)

MAX_QUERY_PAIRS_HELP = (
    "Refuse a query with more pairs than this ('&' or ';' separated): a request costs at "
    "most a few times a normal decision, however long its query."
)


@dataclass(frozen=True, slots=True)
class Reading:
    """Which rules are on (all, by default) and the query's pair cap."""

    path_parameters: bool = True
    backslashes: bool = True
    trailing_dots: bool = True
    case_variants: bool = True
    double_encoding: bool = True
    query_spellings: bool = True
    raw_path: bool = True
    max_query_pairs: int = 256


def parse_reading(where: str, table: Any) -> Reading:
    """The `[reading]` table of the config file."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([reading])")
    names = {r.name for r in RULES}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in names:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: must be true or false, got {value!r}")
        elif key == "max_query_pairs":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}.{key}: must be a positive whole number")
        else:
            raise ConfigError(
                f"{where}: unknown rule {key!r} (one of {', '.join(sorted(names))}, "
                "max_query_pairs)"
            )
        values[key] = value
    return Reading(**values)
