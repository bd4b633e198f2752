"""The error tree. Foreign errors (redis, OS) are mapped to these at the boundary."""

from __future__ import annotations


class AuthgateError(Exception):
    """Base class for every error authgate raises on purpose."""


class ConfigError(AuthgateError):
    """Configuration is invalid; the message names the setting."""


class InvalidInput(AuthgateError):
    """A caller passed a value authgate refuses; nothing was changed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(AuthgateError):
    """No token with that id."""


# Why a lookup could not be answered: the `reason` label of authgate_lookup_unavailable_total.
UNAVAILABLE_REASONS = ("timeout", "connection", "pool", "malformed", "error")


class BackendUnavailable(AuthgateError):
    """Redis could not be reached or did not answer in time.

    `reason` is one of UNAVAILABLE_REASONS, decided where the foreign error is mapped, so
    the metric that counts these never needs to look at messages (or requests) to label them.
    """

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class WrongType(InvalidInput):
    """A field of a request has the wrong JSON type (a number for a string, …)."""

    def __init__(self, field: str, expected: str) -> None:
        super().__init__(field, f"must be {expected}")
        self.expected = expected


class Refused(AuthgateError):
    """A management call that is not allowed: who is calling, or what it asks for.

    `code` names a row of the management API's error table (`manage.ERRORS`), which gives
    the status; `details` go to the caller as they are (never a token value)."""

    def __init__(self, code: str, message: str | None = None, **details: object) -> None:
        super().__init__(code)
        self.code = code
        self.message = message
        self.details = details
