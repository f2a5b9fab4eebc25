"""The one table that turns FLM's errors into HTTP errors (``flm.openai.errors.ERROR_MAP``),
as the gateway answers them: status, code, type, and whether the message is shown."""

from __future__ import annotations

import pytest

from flm.core import errors as e
from flm.engines.base import NotSupportedError
from flm.http.client import FlmListenerError, _status_error
from flm.openai.errors import ERROR_MAP, HttpError, error_type, http_status


@pytest.mark.parametrize(
    ("error", "status", "code", "kind", "shown"),
    [
        (e.EngineNotFoundError("x"), 404, "not_found", "not_found_error", True),
        (NotSupportedError("x"), 404, "route_disabled", "not_found_error", True),
        (e.EngineRequestRejectedError("x"), 400, "invalid_request", "invalid_request_error", True),
        (e.EngineNetworkError("x"), 503, "engine_unavailable", "engine_error", True),
        (e.EngineTimeoutError("x"), 504, "engine_timeout", "engine_error", True),
        (e.EngineApiError("x"), 502, "engine_error", "engine_error", True),
        (e.EngineInstallError("x"), 502, "engine_error", "engine_error", True),
        (FlmListenerError("x"), 502, "engine_error", "engine_error", True),
        (e.EngineError("x"), 502, "engine_error", "engine_error", True),
        (e.UsageError("x"), 400, "invalid_request", "invalid_request_error", True),
        (e.NotFoundError("x"), 404, "not_found", "not_found_error", True),
        # everything else stays a 500 whose message is FLM's to log, not the client's to read
        (e.RepoError("x"), 500, "internal_error", "server_error", False),
        (e.MigrationFailedError("x"), 500, "internal_error", "server_error", False),
        (e.PolicyInvalidError("x"), 500, "internal_error", "server_error", False),
        (e.ProxyError("x"), 500, "internal_error", "server_error", False),
        (e.InternalError("x"), 500, "internal_error", "server_error", False),
        (e.FlmError("x"), 500, "internal_error", "server_error", False),
    ],
)
def test_each_error_class_maps_to_one_status_code_and_type(
    error: e.FlmError, status: int, code: str, kind: str, shown: bool
) -> None:
    assert http_status(error) == (status, code)
    http = HttpError.from_flm(error)
    assert (http.status, http.code, error_type(http.status)) == (status, code, kind)
    assert http.message == ("x" if shown else "internal error")


@pytest.mark.parametrize(
    ("upstream", "status", "code"),
    [
        (400, 400, "invalid_request"),
        (401, 400, "invalid_request"),
        (422, 400, "invalid_request"),
        (404, 404, "not_found"),
        (408, 504, "engine_timeout"),
        (429, 503, "engine_unavailable"),
        (500, 502, "engine_error"),
        (502, 502, "engine_error"),
        (503, 503, "engine_unavailable"),
        (504, 504, "engine_timeout"),
    ],
)
def test_an_engines_http_status_becomes_the_gateways(upstream: int, status: int, code: str) -> None:
    error = _status_error(upstream, "m")
    assert http_status(error) == (status, code)
    assert error.details == {"upstream_status": upstream}


def test_the_table_ends_in_flm_error() -> None:
    """Every FLM error finds a row: the most general one is FlmError's."""
    assert ERROR_MAP[e.FlmError] == (500, "internal_error")
    assert all(issubclass(cls, e.FlmError) for cls in ERROR_MAP)
