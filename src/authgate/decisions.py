"""The decision table's codes and statuses (SPEC §2), in one place."""

from __future__ import annotations

CODES: dict[str, int] = {
    "TOKEN_MISSING": 401,
    "TOKEN_MISMATCH": 401,
    "TOKEN_INVALID": 404,
    "TOKEN_EXPIRED": 401,
    "TOKEN_DISABLED": 403,
    "IP_NOT_ALLOWED": 403,
    "SCOPE_MISMATCH": 403,
    "INSUFFICIENT_KEY_TYPE": 403,
    "ADMIN_REQUIRED": 403,
    "INSUFFICIENT_PERMISSIONS": 403,
    "UNAVAILABLE": 503,
    "BAD_REQUEST": 400,
}

MESSAGES: dict[str, str] = {
    "TOKEN_MISSING": "No API token was sent.",
    "TOKEN_MISMATCH": "The token sources carry different values.",
    "TOKEN_INVALID": "The token is not valid.",
    "TOKEN_EXPIRED": "The token has expired.",
    "TOKEN_DISABLED": "The token is disabled.",
    "IP_NOT_ALLOWED": "The client address is not allowed for this token.",
    "SCOPE_MISMATCH": "The token is not scoped to this resource.",
    "INSUFFICIENT_KEY_TYPE": "The token's key type does not allow this method.",
    "ADMIN_REQUIRED": "System APIs need a token with the admin role.",
    "INSUFFICIENT_PERMISSIONS": "The token lacks a permission this route requires.",
    "UNAVAILABLE": "Token storage is unavailable; try again shortly.",
    "BAD_REQUEST": "The request could not be interpreted.",
}

# What nginx's auth_request accepts from the subrequest: 2xx, 401, 403.
NGINX_FOLD: dict[int, int] = {401: 401, 403: 403, 404: 401, 503: 401, 400: 403}

METHOD_FLAG: dict[str, str] = {
    "GET": "r",
    "HEAD": "r",
    "OPTIONS": "r",
    "POST": "w",
    "PUT": "w",
    "PATCH": "w",
    "DELETE": "d",
}
