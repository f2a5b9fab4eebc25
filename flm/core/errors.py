"""FLM's one error tree.

Every failure that crosses a layer boundary is one of these. Third-party exceptions (sqlite3,
aiohttp, ssl, OSError) are translated into them at the boundary where they happen and nowhere
else. The CLI renders them as ``{"error": {"code", "message"}}`` with ``exit_code``; the proxy
maps them to HTTP statuses and OpenAI error codes in one table, ``flm.openai.errors.ERROR_MAP``.
"""

from __future__ import annotations

from typing import Any


class FlmError(Exception):
    """Base of every FLM error. ``code`` is the stable, documented identifier."""

    code: str = "INTERNAL_ERROR"
    #: 1 = the user can fix it; 2 = FLM (or the machine) is at fault.
    exit_code: int = 1

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class InternalError(FlmError):
    code = "INTERNAL_ERROR"
    exit_code = 2


class UsageError(FlmError):
    """Bad command-line usage or a bad value given by the user."""

    code = "INVALID_ARGUMENT"


class NotFoundError(FlmError):
    code = "NOT_FOUND"


class ConfigNotSetError(FlmError):
    code = "CONFIG_NOT_SET"


class IoError(FlmError):
    code = "IO_ERROR"
    exit_code = 2


# --- storage -----------------------------------------------------------------------------------


class RepoError(FlmError):
    """Database failure."""

    code = "DB_ERROR"
    exit_code = 2


class MigrationFailedError(RepoError):
    """A write was attempted while a database is in read-only safe mode."""

    code = "MIGRATION_FAILED"
    exit_code = 1


# --- policy --------------------------------------------------------------------------------------


class PolicyInvalidError(FlmError):
    code = "POLICY_INVALID"


# --- engines -------------------------------------------------------------------------------------


class EngineError(FlmError):
    code = "ENGINE_API_ERROR"


class EngineNotFoundError(EngineError):
    code = "ENGINE_NOT_FOUND"


class EngineNetworkError(EngineError):
    code = "ENGINE_NETWORK_ERROR"


class EngineApiError(EngineError):
    code = "ENGINE_API_ERROR"


class EngineRequestRejectedError(EngineApiError):
    """The engine refused the request itself (an HTTP 4xx other than 404, 408 or 429): the
    client's request was wrong for it."""


class EngineNotSupportedError(EngineError):
    """The engine kind has no such feature (e.g. audio transcription)."""


class EngineTimeoutError(EngineError):
    code = "ENGINE_TIMEOUT"


class EngineInstallError(EngineError):
    code = "ENGINE_INSTALL_ERROR"


# --- proxy ---------------------------------------------------------------------------------------


class ProxyError(FlmError):
    code = "PROXY_INVALID_CONFIG"


class ProxyAlreadyRunningError(ProxyError):
    code = "PROXY_ALREADY_RUNNING"


class ProxyPortInUseError(ProxyError):
    code = "PROXY_PORT_IN_USE"


class ProxyCertError(ProxyError):
    code = "PROXY_CERT_FAILED"


class ProxyAcmeError(ProxyError):
    code = "PROXY_ACME_ERROR"


class ProxyNotRunningError(ProxyError):
    code = "PROXY_NOT_RUNNING"


# --- ACME DNS-01 (each names what the user can do about it) --------------------------------------


class DnsAuthError(ProxyAcmeError):
    """The DNS server or API did not accept FLM's credentials (wrong TSIG key, bad token)."""

    code = "DNS_AUTH_FAILED"


class DnsZoneNotFoundError(ProxyAcmeError):
    """The DNS server is not authoritative for the profile's zone (or the API has no such zone)."""

    code = "DNS_ZONE_NOT_FOUND"


class DnsUpdateRefusedError(ProxyAcmeError):
    """Authenticated, but the server's policy (or the token's scope) refuses the change."""

    code = "DNS_UPDATE_REFUSED"


class DnsServerUnreachableError(ProxyAcmeError):
    """The DNS server or API cannot be reached at all."""

    code = "DNS_SERVER_UNREACHABLE"


class DnsNotVisibleError(ProxyAcmeError):
    """The TXT record was created but the zone's servers did not answer it before the deadline."""

    code = "DNS_RECORD_NOT_VISIBLE"


class AcmeCaRefusedError(ProxyAcmeError):
    """The ACME CA looked at the DNS-01 answer (or the order) and refused it."""

    code = "ACME_CA_REFUSED"
