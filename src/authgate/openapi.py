"""The OpenAPI 3.1 document of the management API, served at `GET /openapi.json`.

Generated, not written: the paths from `admin.ENDPOINTS` (method, path, query parameters,
body, answer, error codes), the token schemas from the attribute table
(`model.ATTRIBUTE_TABLE`), the error codes and statuses from `manage.ERRORS`. The tests
validate the document and every answer the API gives against it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from . import __version__
from .admin import ENDPOINTS, Endpoint
from .manage import ERRORS, LIST_STATUSES
from .model import (
    ATTRIBUTE_TABLE,
    EXPIRES_IN_HELP,
    KEY_TYPES,
    MAX_LIST,
    STATUSES,
    WILDCARD,
    Attribute,
)
from .usage import TOKEN_DENIALS

DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)\s*$"  # a unit is required
TOKEN_ID_PATTERN = r"^tok_[0-9A-HJKMNP-TV-Z]{26}$"
ERROR_CODES = tuple(ERRORS)
# Codes any authenticated endpoint may answer (a query parameter it does not take is
# INVALID_INPUT, an oversized query BAD_REQUEST).
AUTH_CODES = (
    "BAD_REQUEST",
    "INVALID_INPUT",
    "TOKEN_MISSING",
    "TOKEN_MISMATCH",
    "TOKEN_INVALID",
    "TOKEN_EXPIRED",
    "TOKEN_DISABLED",
    "IP_NOT_ALLOWED",
    "INSUFFICIENT_KEY_TYPE",
    "UNAVAILABLE",
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "enum" in schema:
        schema = {**schema, "enum": [*schema["enum"], None]}
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    if isinstance(kind, list):
        return {**schema, "type": [*kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


# -- attributes -------------------------------------------------------------------------------
def _pattern(attr: Attribute) -> str:
    assert attr.pattern is not None
    inner = attr.pattern.pattern.removeprefix("^").removesuffix("$")
    if attr.wildcard:
        return rf"^(\{WILDCARD}|{inner})$"
    return f"^{inner}$"


def input_schema(attr: Attribute) -> dict[str, Any]:
    """What a caller may send for `attr` (create or PATCH)."""
    if attr.kind == "text":
        schema: dict[str, Any] = {"type": "string", "maxLength": attr.limit}
        if attr.required:
            schema["minLength"] = 1
    elif attr.kind == "ident":
        schema = {"type": "string", "pattern": _pattern(attr)}
    elif attr.kind == "choice":
        if attr.name == "key_type":
            schema = _ref("KeyType")
        else:
            schema = {"type": "string", "enum": list(attr.choices)}
    elif attr.kind == "list":
        schema = {
            "type": ["array", "string"],
            "items": {"type": "string"},
            "maxItems": MAX_LIST,
            "description": "An array of strings, or one comma-separated string.",
        }
    elif attr.kind == "time":
        schema = {"type": "string", "format": "date-time"}
    else:
        schema = {"type": "boolean"}
    if "$ref" in schema:
        schema = {"allOf": [schema]}
    if attr.kind != "bool" and not attr.required:
        schema = _nullable(schema)
    extra = schema.pop("description", "")
    return {**schema, "description": f"{attr.help} {extra}".strip()}


def output_schema(attr: Attribute) -> dict[str, Any]:
    """How a token's view shows `attr`."""
    if attr.kind == "list":
        return {"type": "array", "items": {"type": "string"}}
    if attr.kind == "time":
        return {"type": ["string", "null"], "format": "date-time"}
    if attr.kind == "bool":
        return {"type": "boolean"}
    if attr.kind == "choice":
        return {"type": "string", "enum": list(attr.choices)}
    return {"type": "string"}


_EXPIRES_IN = {
    "description": EXPIRES_IN_HELP,
    "type": ["string", "null"],
    "pattern": DURATION_PATTERN,
}
_TIME = {"type": ["string", "null"], "format": "date-time"}


def _schemas() -> dict[str, Any]:
    spec_attrs = [a for a in ATTRIBUTE_TABLE if a.create]
    patch_attrs = [a for a in ATTRIBUTE_TABLE if a.patch]
    token_spec = {
        "type": "object",
        "additionalProperties": False,
        "required": [a.name for a in spec_attrs if a.required],
        "properties": {
            **{a.name: input_schema(a) for a in spec_attrs},
            "expires_in": _EXPIRES_IN,
        },
    }
    token_patch = {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "description": "Only these attributes change; the value, kind, key type, roles and "
        "scope never do. Nothing may exceed what the caller could create.",
        "properties": {
            **{a.name: input_schema(a) for a in patch_attrs},
            "expires_in": _EXPIRES_IN,
        },
    }
    token_id = {"type": "string", "pattern": TOKEN_ID_PATTERN}
    token = {
        "type": "object",
        "description": "A token's public view: never its value or hash.",
        "required": [
            "id", "display_prefix", *(a.name for a in ATTRIBUTE_TABLE), "environment",
            "created_at", "created_by", "updated_at", "revoked_at", "last_used_at",
            "last_client_ip", "request_count", "status",
        ],
        "properties": {
            "id": token_id,
            "display_prefix": {"type": "string", "description": "Prefix + 4 characters."},
            **{a.name: output_schema(a) for a in ATTRIBUTE_TABLE},
            "environment": {"type": "string", "enum": ["live", "test"]},
            "created_at": {"type": "string", "format": "date-time"},
            "created_by": {"type": "string", "description": "Management token id or CLI user."},
            "updated_at": _TIME,
            "updated_by": {"type": "string"},
            "revoked_at": _TIME,
            "last_used_at": _TIME,
            "last_client_ip": {"type": ["string", "null"]},
            "request_count": {"type": "integer", "minimum": 0},
            "status": {"type": "string", "enum": list(STATUSES)},
            "rotated_from": token_id,
            "rotated_to": token_id,
        },
    }  # fmt: skip
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
                "description": "How long the old token keeps working, with a unit (default "
                "0s, at most 30d).",
                "type": "string",
                "pattern": DURATION_PATTERN,
            }
        },
    }
    counts = {
        "type": "object",
        "propertyNames": {"enum": list(TOKEN_DENIALS)},
        "additionalProperties": {"type": "integer", "minimum": 0},
    }
    day = {
        "type": "object",
        "required": ["date", "allowed", "denied", "last_client_ip"],
        "properties": {
            "date": {"type": "string", "format": "date"},
            "allowed": {"type": "integer", "minimum": 0},
            "denied": counts,
            "last_client_ip": {"type": ["string", "null"]},
        },
    }
    usage = {
        "type": "object",
        "required": ["id", "days", "totals"],
        "properties": {
            "id": token_id,
            "days": {"type": "array", "items": _ref("UsageDay")},
            "totals": {
                "type": "object",
                "required": ["allowed", "denied", "request_count", "last_used_at"],
                "properties": {
                    "allowed": {"type": "integer", "minimum": 0},
                    "denied": counts,
                    "request_count": {"type": "integer", "minimum": 0},
                    "last_used_at": _TIME,
                    "last_client_ip": {"type": ["string", "null"]},
                },
            },
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
                "description": "create, update (detail.fields names what changed), revoke, "
                "rotate, delete, denied (the caller was not let in or not allowed) or "
                "rejected (its input was refused).",
            },
            "actor": {"type": ["string", "null"]},
            "token_id": {"type": ["string", "null"]},
            "display_prefix": {"type": ["string", "null"]},
            "scope": {
                "type": ["object", "null"],
                "description": "org, project and space of the token the event is about.",
            },
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
                    "details": {
                        "type": "object",
                        "description": "`field` names the input at fault.",
                    },
                },
            }
        },
    }
    return {
        "KeyType": {
            "type": "string",
            "enum": list(KEY_TYPES),
            "description": "r = GET/HEAD/OPTIONS, w = POST/PUT/PATCH, d = DELETE. `---` is "
            "refused.",
        },
        "TokenSpec": token_spec,
        "TokenPatch": token_patch,
        "Token": token,
        "CreatedToken": created,
        "TokenList": {
            "type": "object",
            "required": ["tokens", "next_cursor"],
            "properties": {
                "tokens": {"type": "array", "items": _ref("Token")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null at the end.",
                },
            },
        },
        "RotateRequest": rotate,
        "UsageDay": day,
        "Usage": usage,
        "AuditEvent": audit_event,
        "AuditList": {
            "type": "object",
            "required": ["events", "next_cursor"],
            "properties": {
                "events": {"type": "array", "items": _ref("AuditEvent")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for older events; null at the end.",
                },
            },
        },
        "Error": error,
    }


# -- paths ------------------------------------------------------------------------------------
def _error_responses(endpoint: Endpoint) -> dict[str, Any]:
    codes = [*AUTH_CODES, *endpoint.errors]
    by_status: dict[int, list[str]] = {}
    for code in ERRORS:
        if code in codes:
            by_status.setdefault(ERRORS[code][0], []).append(code)
    out: dict[str, Any] = {}
    for status in sorted(by_status):
        names = by_status[status]
        answer: dict[str, Any] = {
            "description": ", ".join(names) + ". " + " ".join(ERRORS[n][1] for n in names[:1]),
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if status == 429:
            answer["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}
            }
        out[str(status)] = answer
    return out


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    if endpoint.operation == "openapi":
        return {
            "operationId": "openapi",
            "summary": endpoint.summary,
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    ok: dict[str, Any] = {
        "description": endpoint.summary.split(";")[0].split(". Needs")[0] + ".",
        "content": {"application/json": {"schema": _ref(endpoint.answer)}},
    }
    if endpoint.status == 201:
        ok["headers"] = {
            "Location": {"schema": {"type": "string"}, "description": "/v1/tokens/{id}"}
        }
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "responses": {str(endpoint.status): ok, **_error_responses(endpoint)},
    }
    if endpoint.params:
        operation["parameters"] = [
            {
                "name": p.name,
                "in": "query",
                "required": False,
                "schema": p.schema,
                "description": p.help,
            }
            for p in endpoint.params
        ]
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": endpoint.body_required,
            "content": {"application/json": {"schema": _ref(endpoint.body)}},
        }
    return operation


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        item = paths.setdefault(endpoint.path, {})
        if "{id}" in endpoint.path and "parameters" not in item:
            item["parameters"] = [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": TOKEN_ID_PATTERN},
                }
            ]
        item[endpoint.method.lower()] = _operation(endpoint)
    return paths


def build() -> dict[str, Any]:
    """The document as a dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "authgate management API",
            "version": __version__,
            "description": "Create, list, show, change, rotate, revoke and delete API tokens, "
            "read their usage and the audit stream. Authenticate with a `management` token as "
            "`Authorization: Bearer <token>` or `X-API-Key: <token>`: reads need key type "
            "`r`, create, update and rotate `w`, revoke and delete `d`. A management token "
            f"sees only the tokens of its org and project (`{WILDCARD}`: all); others are "
            "404. What it creates or changes is never more powerful than itself. List "
            f"statuses: {', '.join(LIST_STATUSES)}. Errors are "
            '`{"error": {"code", "message", "details"}}`.',
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
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
