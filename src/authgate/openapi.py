"""The OpenAPI 3.1 document of the management API, served at `GET /openapi.json`.

Kept next to the code it describes: `admin.py` checks request bodies against the same
field lists, and the tests validate every response the API gives against these schemas.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from . import __version__
from .model import KEY_TYPES, KINDS, MAX_LIST

DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*$"
TOKEN_ID_PATTERN = r"^tok_[0-9A-HJKMNP-TV-Z]{26}$"
ERROR_CODES = (
    "TOKEN_MISSING",
    "TOKEN_MISMATCH",
    "TOKEN_INVALID",
    "TOKEN_EXPIRED",
    "IP_NOT_ALLOWED",
    "INSUFFICIENT_KEY_TYPE",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "INVALID_INPUT",
    "BAD_REQUEST",
    "UNAVAILABLE",
)

# Fields of a create body by JSON type; admin.py enforces these before model.validate_spec.
TEXT_FIELDS = (
    "name",
    "description",
    "kind",
    "key_type",
    "org",
    "project",
    "space",
    "feature",
    "user_id",
    "expires_at",
)
LIST_FIELDS = ("roles", "permissions", "ip_allowlist", "app_ids")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
        **extra,
    }


def _errors(*names: str) -> dict[str, Any]:
    status = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "Forbidden": "403",
        "NotFound": "404",
        "InvalidInput": "422",
        "Unavailable": "503",
    }
    return {status[n]: {"$ref": f"#/components/responses/{n}"} for n in names}


_AUTH_ERRORS = ("Unauthorized", "Forbidden", "Unavailable")
_IDENT = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"}
_OPTIONAL_IDENT = {**_IDENT, "type": ["string", "null"]}
_LIST = {
    "type": ["array", "string", "null"],
    "items": {"type": "string"},
    "maxItems": MAX_LIST,
    "description": "An array of strings, or one comma-separated string.",
}
_TIME = {"type": ["string", "null"], "format": "date-time"}


def _schemas() -> dict[str, Any]:
    key_type = {
        "type": "string",
        "enum": list(KEY_TYPES),
        "description": "r = GET/HEAD/OPTIONS, w = POST/PUT/PATCH, d = DELETE. `---` is refused.",
    }
    token_spec = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "org", "project", "key_type"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "description": {"type": ["string", "null"], "maxLength": 500},
            "kind": {"type": ["string", "null"], "enum": [*KINDS, None], "default": "query"},
            "key_type": _ref("KeyType"),
            "roles": {**_LIST, "description": "`admin` opens the System APIs."},
            "org": _IDENT,
            "project": _IDENT,
            "space": _OPTIONAL_IDENT,
            "feature": _OPTIONAL_IDENT,
            "user_id": {"type": ["string", "null"], "maxLength": 128},
            "permissions": {**_LIST, "description": "Scopes such as `read:assets`."},
            "ip_allowlist": {**_LIST, "description": "IPv4/IPv6 addresses and CIDRs."},
            "app_ids": {**_LIST, "description": "Shared apps this token is bound to."},
            "expires_in": {
                "description": "A duration (`90s`, `12h`, `30d`) or seconds; at most 10 years.",
                "oneOf": [
                    {"type": "string", "pattern": DURATION_PATTERN},
                    {"type": "number", "exclusiveMinimum": 0, "maximum": 10 * 365 * 86400},
                    {"type": "null"},
                ],
            },
            "expires_at": {
                **_TIME,
                "description": "ISO 8601 with a time zone; not with expires_in.",
            },
        },
    }
    strings = {"type": "array", "items": {"type": "string"}}
    token = {
        "type": "object",
        "description": "A token's public view: never its value or hash.",
        "required": [
            "id",
            "display_prefix",
            "name",
            "description",
            "kind",
            "key_type",
            "roles",
            "org",
            "project",
            "space",
            "feature",
            "user_id",
            "permissions",
            "ip_allowlist",
            "app_ids",
            "environment",
            "created_at",
            "created_by",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "request_count",
            "status",
        ],
        "properties": {
            "id": {"type": "string", "pattern": TOKEN_ID_PATTERN},
            "display_prefix": {"type": "string", "description": "Prefix + 4 characters."},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "kind": {"type": "string", "enum": list(KINDS)},
            "key_type": _ref("KeyType"),
            "roles": strings,
            "org": {"type": "string"},
            "project": {"type": "string"},
            "space": {"type": "string"},
            "feature": {"type": "string"},
            "user_id": {"type": "string"},
            "permissions": strings,
            "ip_allowlist": strings,
            "app_ids": strings,
            "environment": {"type": "string", "enum": ["live", "test"]},
            "created_at": {"type": "string", "format": "date-time"},
            "created_by": {"type": "string", "description": "Management token id or CLI user."},
            "expires_at": _TIME,
            "revoked_at": _TIME,
            "last_used_at": _TIME,
            "request_count": {"type": "integer", "minimum": 0},
            "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
            "rotated_from": {"type": "string", "pattern": TOKEN_ID_PATTERN},
            "rotated_to": {"type": "string", "pattern": TOKEN_ID_PATTERN},
        },
    }
    created = {
        "allOf": [
            _ref("Token"),
            {
                "type": "object",
                "required": ["token"],
                "properties": {
                    "token": {
                        "type": "string",
                        "description": "The token value. Shown in this response only.",
                    }
                },
            },
        ]
    }
    rotate = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "grace": {
                "description": "How long the old token keeps working (default 0, at most 30d).",
                "oneOf": [
                    {"type": "string", "pattern": DURATION_PATTERN},
                    {"type": "number", "minimum": 0, "maximum": 30 * 86400},
                ],
            }
        },
    }
    audit_event = {
        "type": "object",
        "required": ["event_id", "time", "action", "actor", "token_id", "display_prefix"],
        "properties": {
            "event_id": {"type": "string"},
            "time": _TIME,
            "action": {
                "type": ["string", "null"],
                "description": "create, revoke, rotate, delete, show, list, audit, "
                "denied (authentication or authorization failed) or rejected "
                "(an authenticated call that failed).",
            },
            "actor": {"type": ["string", "null"]},
            "token_id": {"type": ["string", "null"]},
            "display_prefix": {"type": ["string", "null"]},
            "detail": {"type": "object"},
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string", "enum": list(ERROR_CODES)},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            }
        },
    }
    return {
        "KeyType": key_type,
        "TokenSpec": token_spec,
        "Token": token,
        "CreatedToken": created,
        "TokenList": {
            "type": "object",
            "required": ["tokens"],
            "properties": {"tokens": {"type": "array", "items": _ref("Token")}},
        },
        "RotateRequest": rotate,
        "AuditEvent": audit_event,
        "AuditList": {
            "type": "object",
            "required": ["events"],
            "properties": {"events": {"type": "array", "items": _ref("AuditEvent")}},
        },
        "Error": error,
    }


def _responses() -> dict[str, Any]:
    return {
        "BadRequest": _response(
            "BAD_REQUEST: the body is not a JSON object, is too large, or a field or query "
            "parameter has the wrong type.",
            "Error",
        ),
        "Unauthorized": _response(
            "TOKEN_MISSING, TOKEN_MISMATCH, TOKEN_INVALID (unknown, revoked, not a management "
            "token, other environment) or TOKEN_EXPIRED.",
            "Error",
            headers={"WWW-Authenticate": {"schema": {"type": "string"}}},
        ),
        "Forbidden": _response(
            "IP_NOT_ALLOWED, or INSUFFICIENT_KEY_TYPE (details.required names the flag).",
            "Error",
        ),
        "NotFound": _response("NOT_FOUND: no token with that id.", "Error"),
        "InvalidInput": _response(
            "INVALID_INPUT: details.field names the attribute at fault. Nothing was written.",
            "Error",
        ),
        "Unavailable": _response("UNAVAILABLE: Redis cannot be reached; retry.", "Error"),
    }


def _token_id() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": TOKEN_ID_PATTERN},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _created(description: str) -> dict[str, Any]:
    return _response(
        description,
        "CreatedToken",
        headers={"Location": {"schema": {"type": "string"}, "description": "/v1/tokens/{id}"}},
    )


def _paths() -> dict[str, Any]:
    limit = {"type": "integer", "minimum": 1, "maximum": 1000}
    return {
        "/v1/tokens": {
            "get": {
                "operationId": "listTokens",
                "summary": "List tokens (never their values). Needs `r`.",
                "parameters": [
                    _query("org", {"type": "string"}, "Only this org."),
                    _query("project", {"type": "string"}, "Only this project."),
                    _query(
                        "status",
                        {"type": "string", "enum": ["active", "revoked", "expired"]},
                        "Only tokens in this state.",
                    ),
                    _query("limit", {**limit, "default": 1000}, "At most this many."),
                ],
                "responses": {
                    "200": _response("Tokens, oldest first.", "TokenList"),
                    **_errors("BadRequest", *_AUTH_ERRORS, "InvalidInput"),
                },
            },
            "post": {
                "operationId": "createToken",
                "summary": "Create a token; its value is in this response only. Needs `w`.",
                "description": "A management token may create management tokens only with "
                "flags it holds itself.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("TokenSpec")}},
                },
                "responses": {
                    "201": _created("Created."),
                    **_errors("BadRequest", *_AUTH_ERRORS, "InvalidInput"),
                },
            },
        },
        "/v1/tokens/{id}": {
            "parameters": [_token_id()],
            "get": {
                "operationId": "showToken",
                "summary": "One token, with its usage. Needs `r`.",
                "responses": {
                    "200": _response("The token.", "Token"),
                    **_errors(*_AUTH_ERRORS, "NotFound"),
                },
            },
            "delete": {
                "operationId": "deleteToken",
                "summary": "Delete for good; it stops working at once. Needs `d`.",
                "responses": {
                    "200": _response("The token as it was.", "Token"),
                    **_errors(*_AUTH_ERRORS, "NotFound"),
                },
            },
        },
        "/v1/tokens/{id}/revoke": {
            "parameters": [_token_id()],
            "post": {
                "operationId": "revokeToken",
                "summary": "Revoke now (idempotent). Needs `d`.",
                "responses": {
                    "200": _response("The revoked token.", "Token"),
                    **_errors(*_AUTH_ERRORS, "NotFound"),
                },
            },
        },
        "/v1/tokens/{id}/rotate": {
            "parameters": [_token_id()],
            "post": {
                "operationId": "rotateToken",
                "summary": "Issue a new token with the same attributes. Needs `w`.",
                "description": "The old token keeps working for `grace`, then expires.",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("RotateRequest")}},
                },
                "responses": {
                    "201": _created("The new token."),
                    **_errors("BadRequest", *_AUTH_ERRORS, "NotFound", "InvalidInput"),
                },
            },
        },
        "/v1/audit": {
            "get": {
                "operationId": "readAudit",
                "summary": "Audit events, newest first. Needs `r`.",
                "parameters": [_query("count", {**limit, "default": 50}, "How many events.")],
                "responses": {
                    "200": _response("Events.", "AuditList"),
                    **_errors("BadRequest", *_AUTH_ERRORS, "InvalidInput"),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document. No token needed.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def build() -> dict[str, Any]:
    """The document as a dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "authgate management API",
            "version": __version__,
            "description": "Create, list, show, revoke, rotate and delete API tokens, and read "
            "the audit stream. Authenticate with a `management` token as "
            "`Authorization: Bearer <token>` or `X-API-Key: <token>`: reads need key type "
            "`r`, create and rotate `w`, revoke and delete `d`. Errors are "
            '`{"error": {"code", "message", "details"}}`.',
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


@cache
def document() -> bytes:
    """The document as JSON bytes, built once."""
    return orjson.dumps(build())
