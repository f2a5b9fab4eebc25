"""OpenAI-style error bodies (SPEC §4.3)."""

from __future__ import annotations

import json
from typing import Any

from flm.core.errors import (
    EngineError,
    EngineNetworkError,
    EngineNotFoundError,
    EngineNotSupportedError,
    EngineRequestRejectedError,
    EngineTimeoutError,
    FlmError,
    NotFoundError,
    UsageError,
)
from flm.core.ids import new_request_id

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
}


#: FLM's errors as API clients see them: class → (HTTP status, error code); the error ``type``
#: follows from the status (:func:`error_type`). The most specific class of an error that is
#: listed wins. This is the one place an FLM error becomes an HTTP error.
ERROR_MAP: dict[type[FlmError], tuple[int, str]] = {
    EngineNotFoundError: (404, "not_found"),
    EngineNotSupportedError: (404, "route_disabled"),
    EngineRequestRejectedError: (400, "invalid_request"),
    EngineNetworkError: (503, "engine_unavailable"),
    EngineTimeoutError: (504, "engine_timeout"),
    EngineError: (502, "engine_error"),  # EngineApiError, EngineInstallError
    UsageError: (400, "invalid_request"),
    NotFoundError: (404, "not_found"),
    FlmError: (500, "internal_error"),
}


def http_status(error: FlmError) -> tuple[int, str]:
    """``error``'s (HTTP status, error code), from :data:`ERROR_MAP`."""
    for cls in type(error).__mro__:
        mapped = ERROR_MAP.get(cls)
        if mapped is not None:
            return mapped
    return 500, "internal_error"


class HttpError(Exception):
    """An error answered to an API client: status, stable code, message."""

    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []

    @classmethod
    def from_flm(cls, error: FlmError) -> HttpError:
        """``error`` as the API answers it (:data:`ERROR_MAP`); the message of an error that
        maps to 500 stays in FLM's log, the client gets "internal error"."""
        status, code = http_status(error)
        return cls(status, code, error.message if status != 500 else "internal error")


class NoSuchRoute(HttpError):
    """404 for a path the gateway does not serve: the one 404 that counts as probing
    (SPEC §5.3); an engine's own 404 or an unknown model does not."""

    def __init__(self) -> None:
        super().__init__(404, "not_found", "no such route")


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "engine_error" if status in (502, 503, 504) else "server_error"


def error_body(status: int, code: str, message: str, request_id: str) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "type": error_type(status),
            "request_id": request_id,
        }
    }


def error_bytes(status: int, code: str, message: str, request_id: str) -> bytes:
    return json.dumps(error_body(status, code, message, request_id), separators=(",", ":")).encode()


def refusal(status: int, code: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """An HTTP server's own refusal (``HttpServer(refusal=)``: the app never saw the request)
    in the error contract: the JSON body and a fresh request id, like every other response."""
    rid = new_request_id()
    return (
        [(b"content-type", b"application/json"), (b"x-request-id", rid.encode())],
        error_bytes(status, code, message, rid),
    )
