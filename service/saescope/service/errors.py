"""Domain errors of the service, each carrying the gRPC status it maps to.

The engine raises these (it knows nothing of gRPC); the app maps ``code`` to a gRPC status in
one place. Messages are for the user: they name the field and the limit, never a traceback.
Only ``Unavailable`` asks the caller to retry (the SDK does, with backoff).
"""

from __future__ import annotations

from typing import ClassVar

INTERNAL_DETAILS = "internal error; the server log has the details"
"""What a caller sees of a server bug: never the exception, its traceback, actor ids or pids."""


class SaescopeError(Exception):
    """Base of every error a caller can cause or see."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SaescopeError):
    """Bad input; the message starts with the field's name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(SaescopeError):
    """An unknown sae_id or feature."""

    code = "NOT_FOUND"


class OutOfRange(SaescopeError):
    """Over a configured limit (prompts, tokens, top_k, max_new_tokens, features)."""

    code = "OUT_OF_RANGE"

    def __init__(self, field: str, value: int, limit: int, what: str = "") -> None:
        detail = f" {what}" if what else ""
        super().__init__(f"{field}: {value}{detail} exceeds the limit of {limit}")
        self.field = field
        self.value = value
        self.limit = limit


class FailedPrecondition(SaescopeError):
    """The call needs something the SAE does not have (ListFeatures without a catalog)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(SaescopeError):
    """Queues are full; retry later."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(SaescopeError):
    """The call's deadline passed before the work finished."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(SaescopeError):
    """A key is required and was missing or wrong."""

    code = "UNAUTHENTICATED"


class PermissionDenied(SaescopeError):
    """The caller may not use the service (e.g. not on loopback while no key is configured)."""

    code = "PERMISSION_DENIED"


class Unavailable(SaescopeError):
    """The service cannot answer now (a replica shutting down or restarting); retry the call."""

    code = "UNAVAILABLE"
