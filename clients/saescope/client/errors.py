"""The SDK's exceptions: one class per gRPC status a caller can meet, all under ``SaescopeError``.

Every ``grpc.RpcError`` the stubs raise becomes one of these (``from_rpc_error``), carrying the
status code's name and the server's message, so callers never handle gRPC types::

    try:
        client.feature(10**9)
    except saescope.client.NotFound as e:
        print(e.code, e.message)   # NOT_FOUND feature: 1000000000 is not in [0, 4096)

A few also derive from the matching built-in exception (``InvalidArgument`` is a ``ValueError``,
``DeadlineExceeded`` a ``TimeoutError``, ``NotFound`` a ``LookupError``), so generic handlers work.
"""

from __future__ import annotations

import re
from typing import ClassVar

import grpc


class SaescopeError(Exception):
    """Base of every error the SDK raises: ``code`` is the gRPC status name, ``message`` the
    server's explanation (its ``details``)."""

    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def status(self) -> grpc.StatusCode | None:
        """The ``grpc.StatusCode`` named by ``code`` (None for a code gRPC does not know)."""
        return _STATUS_BY_NAME.get(self.code)


class _FieldError(SaescopeError):
    """An error whose message starts with the request field it is about (``"top_k: ..."``)."""

    @property
    def field(self) -> str | None:
        """The field the server named at the start of its message, e.g. ``"prompts[1].text"``."""
        match = _FIELD_PREFIX.match(self.message)
        return match.group(1) if match else None


class InvalidArgument(_FieldError, ValueError):
    """Bad input: the message (and ``field``) names the offending request field."""

    default_code = "INVALID_ARGUMENT"


class NotFound(SaescopeError, LookupError):
    """An unknown ``sae_id`` or feature."""

    default_code = "NOT_FOUND"


class OutOfRange(_FieldError):
    """Over one of the service's configured limits (see ``Client.info().limits``)."""

    default_code = "OUT_OF_RANGE"


class FailedPrecondition(SaescopeError):
    """The call needs something the server does not have (e.g. a feature catalog)."""

    default_code = "FAILED_PRECONDITION"


class ResourceExhausted(SaescopeError):
    """The service's queues are full (or a message exceeded a size limit); try again later."""

    default_code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(SaescopeError, TimeoutError):
    """The call's deadline (``timeout=``) passed before the service answered."""

    default_code = "DEADLINE_EXCEEDED"


class Unauthenticated(SaescopeError):
    """The service requires an API key, and it was missing or wrong."""

    default_code = "UNAUTHENTICATED"


class PermissionDenied(SaescopeError):
    """The key is valid but may not make this call."""

    default_code = "PERMISSION_DENIED"


class Unavailable(SaescopeError):
    """The service could not be reached (after the configured retries)."""

    default_code = "UNAVAILABLE"


class Cancelled(SaescopeError):
    """The call was cancelled, by the caller or the server."""

    default_code = "CANCELLED"


class Unimplemented(SaescopeError):
    """The server does not implement this RPC (an older or different server)."""

    default_code = "UNIMPLEMENTED"


class Internal(SaescopeError):
    """The service failed; this is a bug on its side, never the caller's mistake."""

    default_code = "INTERNAL"


class Unknown(SaescopeError):
    """An error without a more specific status (e.g. an exception in a proxy)."""

    default_code = "UNKNOWN"


# "field: message" or "field[2].sub: message", as the service's errors start.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*):\s")

_STATUS_BY_NAME: dict[str, grpc.StatusCode] = {s.name: s for s in grpc.StatusCode}

_CLASS_BY_CODE: dict[str, type[SaescopeError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        OutOfRange,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        Cancelled,
        Unimplemented,
        Internal,
        Unknown,
    )
}


def error_for(code: str, message: str) -> SaescopeError:
    """The exception for status name ``code`` (base ``SaescopeError`` for the rarer ones)."""
    return _CLASS_BY_CODE.get(code, SaescopeError)(code, message)


def from_rpc_error(error: grpc.RpcError) -> SaescopeError:
    """Translate a ``grpc.RpcError`` (sync or aio) into the SDK's exception for its status."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    status = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    return error_for(name, details or str(error) or name.lower().replace("_", " "))
