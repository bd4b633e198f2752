"""The uvicorn internals authgate builds on, in one place.

`fasthttp` hands management-API connections to uvicorn's httptools protocol and shares its
per-server state; `server` runs uvicorn's multiprocess supervisor on sockets it bound
itself. None of that is uvicorn's public API, and it has changed between releases
(`Multiprocess` lost its `target` argument in 0.51; 0.54 reads `alpn_protocols` from the
protocol class). Every such name is imported here, and `problems()` checks the shapes the
rest of authgate relies on, so a uvicorn that moved them is refused at start with one line
instead of failing on the first connection.
"""

from __future__ import annotations

import inspect
import re
import socket
from importlib.metadata import requires, version

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

__all__ = ["Config", "HttpToolsProtocol", "ServerState", "problems", "stop", "supervisor"]

# What each internal is called with here; `problems()` checks the signatures against it.
_PROTOCOL_ARGS = ("config", "server_state", "app_state", "_loop")
_SUPERVISOR_ARGS = ("config", "sockets")
_STATE_ATTRIBUTES = ("connections", "tasks", "default_headers")


def _parameters(fn: object) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")  # type: ignore[arg-type]


def problems() -> list[str]:
    """What differs from the uvicorn internals authgate was written against (empty if none)."""
    found: list[str] = []
    for name, fn, expected in (
        ("HttpToolsProtocol", HttpToolsProtocol.__init__, _PROTOCOL_ARGS),
        ("Multiprocess", Multiprocess.__init__, _SUPERVISOR_ARGS),
    ):
        if (got := _parameters(fn)) != expected:
            found.append(f"{name} takes ({', '.join(got)}), not ({', '.join(expected)})")
    state = ServerState()
    for name in _STATE_ATTRIBUTES:
        if not hasattr(state, name):
            found.append(f"ServerState has no attribute {name!r}")
    if "timeout_keep_alive" not in inspect.signature(Config.__init__).parameters:
        found.append("Config takes no timeout_keep_alive")
    return found


def supported() -> str:
    """The uvicorn versions this authgate allows, from its installed metadata."""
    for line in requires("authgate") or ():
        match = re.match(r"uvicorn\s*(?:\[[^\]]*\])?\s*([^;]+)", line)
        if match:
            return match.group(1).strip()
    return "as pyproject.toml allows"


def describe_problems() -> str | None:
    """One line naming the installed uvicorn and what changed, or None when all is as expected."""
    found = problems()
    if not found:
        return None
    return (
        f"uvicorn {version('uvicorn')} does not have the internals authgate uses "
        f"({'; '.join(found)}): install uvicorn {supported()}"
    )


def supervisor(config: Config, sockets: list[socket.socket]) -> Multiprocess:
    """uvicorn's supervisor: one worker process per `config.workers`, on shared sockets.
    `.run()` runs it; `stop(it)` from another thread ends it as SIGTERM would."""
    return Multiprocess(config, sockets=sockets)


def stop(running: Multiprocess) -> None:
    running.should_exit.set()
