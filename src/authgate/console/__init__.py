"""The web console at `/console/` on the management listener (AUTHGATE_ADMIN_LISTEN).

Server-rendered pages (Starlette, Jinja2) over the management service: sign in with a
management token, then list, create, edit, rotate, disable/enable, revoke and delete the
tokens that token may see, with their usage and audit events.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Mount

from ..config import Settings
from ..manage import Manager
from .service import ConsoleApi
from .session import SessionStore
from .views import SecurityHeaders, create_console

ROOT = "/console"


def console_mount(manager: Manager, redis: Any, settings: Settings) -> Mount:
    """The console as a route to serve beside the management API."""
    sessions = SessionStore(
        redis, settings.key_prefix, settings.pepper.reveal(), settings.console_session_ttl
    )
    app = create_console(ConsoleApi(manager), sessions, ROOT)
    return Mount(ROOT, app=SecurityHeaders(app))


__all__ = ["ROOT", "console_mount"]
