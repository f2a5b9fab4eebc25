"""The security policy document (SPEC §5.1): validation against the shipped JSON Schema."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import islice
from typing import TYPE_CHECKING, Any

from flm.core.errors import PolicyInvalidError
from flm.core.jsondoc import parse_document

if TYPE_CHECKING:
    from jsonschema.protocols import Validator


def _is_network(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the "type" keyword reports non-strings
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


@cache
def _validator() -> Validator:
    from jsonschema import Draft202012Validator, FormatChecker

    schema = json.loads(
        resources.files("flm.core").joinpath("policy.schema.json").read_text(encoding="utf-8")
    )
    checker = FormatChecker()
    checker.checks("ip-network")(_is_network)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=checker)


def _describe(path: str, message: str) -> str:
    return f"{path}: {message}"


def validate_policy(document: Any) -> dict[str, Any]:
    """Return ``document`` if it is a valid policy, else raise ``POLICY_INVALID`` naming every
    offending path (``$.ip_whitelist[0]``)."""
    if not isinstance(document, dict):
        raise PolicyInvalidError(
            f"$: the policy must be a JSON object, got {type(document).__name__}",
            details=[{"path": "$", "message": "not an object"}],
        )
    errors = sorted(
        islice(_validator().iter_errors(document), MAX_ERRORS), key=lambda e: list(e.absolute_path)
    )
    if errors:
        details = [{"path": _clip(e.json_path), "message": _clip(e.message)} for e in errors]
        summary = "; ".join(_describe(d["path"], d["message"]) for d in details[:5])
        if len(errors) >= MAX_ERRORS:
            summary += f" (only the first {MAX_ERRORS} problems are listed)"
        raise PolicyInvalidError(f"invalid policy: {summary}", details=details)
    _check_webhooks(document)
    return document


#: A policy is at most this long as JSON text (a real one is a few kilobytes).
MAX_POLICY_BYTES = 4 * 1024 * 1024
#: At most this many problems are reported, each quoting at most ``_CLIP`` characters.
MAX_ERRORS = 50
_CLIP = 300


def _clip(text: str) -> str:
    """An error text quoting the user's input, cut to a readable length."""
    return text if len(text) <= _CLIP else f"{text[:_CLIP]}… ({len(text)} characters)"


def _check_webhooks(document: dict[str, Any]) -> None:
    from flm.core.alerts import AlertSettings, webhook_problem

    settings = AlertSettings.from_policy(document.get("alerts"))
    if settings is None:
        return
    details = []
    for i, hook in enumerate(settings.webhooks):
        problem = webhook_problem(hook.url, allow_private=settings.allow_private_targets)
        if problem:
            details.append({"path": f"$.alerts.webhooks[{i}]", "message": f"webhook {problem}"})
    if details:
        summary = "; ".join(_describe(d["path"], d["message"]) for d in details[:5])
        raise PolicyInvalidError(f"invalid policy: {summary}", details=details)


def parse_policy_text(text: str) -> dict[str, Any]:
    """Parse and validate a policy given as JSON text."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyInvalidError(
            f"$: the policy is {len(text)} characters long; at most {MAX_POLICY_BYTES} are "
            "accepted",
            details=[{"path": "$", "message": "too long"}],
        )
    try:
        document = parse_document(text)
    except json.JSONDecodeError as exc:
        raise PolicyInvalidError(
            f"$: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            details=[{"path": "$", "message": "not valid JSON"}],
        ) from exc
    except ValueError as exc:
        raise PolicyInvalidError(
            f"$: not valid JSON ({exc})", details=[{"path": "$", "message": str(exc)}]
        ) from exc
    return validate_policy(document)


# --- the policy in force -----------------------------------------------------------------------

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(items: Any) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(str(i), strict=False) for i in (items or []))


def _switch(section: dict[str, Any], exposed: bool) -> bool:
    """Botnet protection parts: on by default when the proxy is reachable from the network,
    off by default on loopback; an explicit ``enabled`` always wins (SPEC §5.3)."""
    value = section.get("enabled")
    return exposed if value is None else bool(value)


@dataclass(frozen=True)
class EffectivePolicy:
    """The validated policy with defaults filled in, for one proxy (loopback or exposed)."""

    whitelist: tuple[_Network, ...] = ()
    trusted_proxies: tuple[_Network, ...] = ()
    #: the header the trusted proxies set with the client's address
    forwarded_header: str = "x-forwarded-for"
    allowed_origins: tuple[str, ...] = ()
    key_rpm: int = 0
    key_burst: int = 0
    ip_rate_enabled: bool = False
    ip_rpm: int = 1000
    ip_burst: int = 100
    blocklist_enabled: bool = False
    max_failures: int = 5
    block_minutes: int = 30
    permanent_threshold: int = 20
    #: blocks made by automatic rules apply to every listener, not only the one that made them
    shared_blocks: bool = False
    #: loopback clients are never blocked by automatic rules
    exempt_loopback: bool = True
    intrusion_enabled: bool = False
    honeypot_enabled: bool = False
    warning_threshold: int = 50
    score_threshold: int = 100
    anomaly_enabled: bool = False
    request_rate_threshold: int = 100
    max_body_bytes: int = 10 * 1024 * 1024
    max_duration_s: float = 300.0
    anomaly_auto_block: bool = True
    resource_enabled: bool = False
    #: host-wide CPU and memory thresholds (percent): opt-in, None unless the policy sets them
    #: (other processes, an engine above all, use the host's CPU; FLM cannot shed that load)
    cpu_threshold: float | None = None
    memory_threshold: float | None = None
    #: FLM's own event-loop lag (ms) and resident memory (MiB) above which it refuses new
    #: requests; 0 turns one off
    max_loop_lag_ms: float = 500.0
    max_rss_mb: float = 4096.0
    max_connections: int = 100
    #: in-flight requests one client address, and one API key, may hold (a fair share)
    max_connections_per_address: int = 25
    max_connections_per_key: int = 25
    security_headers: bool = True
    #: Models the engine runs on a remote service (Ollama's cloud models) are served only when
    #: the policy says so (SPEC local-only guarantee).
    allow_cloud_models: bool = False
    #: Clients never auto-blocked or scored (distinct from the allow-list).
    trusted_clients: tuple[_Network, ...] = ()
    #: open connections one client address may hold (0: no cap), and in all (None: what the
    #: open-file limit allows)
    connections_per_address: int = 128
    connections_total: int | None = None

    @classmethod
    def build(cls, document: dict[str, Any], *, exposed: bool) -> EffectivePolicy:
        doc = validate_policy(document)
        rate = doc.get("rate_limit") or {}
        ip_rate = doc.get("ip_rate_limit") or {}
        block = doc.get("ip_blocklist") or {}
        intrusion = doc.get("intrusion_detection") or {}
        honeypot = doc.get("honeypot") or {}
        anomaly = doc.get("anomaly_detection") or {}
        resource = doc.get("resource_protection") or {}
        headers = doc.get("security_headers") or {}
        connections = doc.get("connections") or {}
        key_rpm = int(rate.get("rpm") or 0)
        ip_rpm = int(ip_rate.get("rpm", 1000))
        intrusion_on = _switch(intrusion, exposed)
        max_connections = int(resource.get("max_connections", 100))
        return cls(
            whitelist=_networks(doc.get("ip_whitelist")),
            trusted_proxies=_networks(doc.get("trusted_proxies")),
            forwarded_header=str(doc.get("forwarded_header", "x-forwarded-for")),
            allowed_origins=tuple((doc.get("cors") or {}).get("allowed_origins") or ()),
            key_rpm=key_rpm,
            key_burst=int(rate.get("burst") or key_rpm),
            ip_rate_enabled=_switch(ip_rate, exposed) and ip_rpm > 0,
            ip_rpm=ip_rpm,
            ip_burst=int(ip_rate.get("burst") or ip_rpm),
            blocklist_enabled=_switch(block, exposed),
            max_failures=int(block.get("max_failures", 5)),
            block_minutes=int(block.get("block_duration_minutes", 30)),
            permanent_threshold=int(block.get("permanent_block_threshold", 20)),
            shared_blocks=bool(block.get("shared", False)),
            exempt_loopback=bool(block.get("exempt_loopback", True)),
            intrusion_enabled=intrusion_on,
            honeypot_enabled=bool(honeypot.get("enabled", intrusion_on)),
            warning_threshold=int(intrusion.get("warning_threshold", 50)),
            score_threshold=int(intrusion.get("score_threshold", 100)),
            anomaly_enabled=_switch(anomaly, exposed),
            request_rate_threshold=int(anomaly.get("request_rate_threshold", 100)),
            max_body_bytes=int(anomaly.get("max_body_bytes", 10 * 1024 * 1024)),
            max_duration_s=float(anomaly.get("max_duration_seconds", 300.0)),
            anomaly_auto_block=bool(anomaly.get("auto_block", True)),
            resource_enabled=_switch(resource, exposed),
            cpu_threshold=(
                float(resource["cpu_threshold"]) if "cpu_threshold" in resource else None
            ),
            memory_threshold=(
                float(resource["memory_threshold"]) if "memory_threshold" in resource else None
            ),
            max_loop_lag_ms=float(resource.get("max_loop_lag_ms", 500)),
            max_rss_mb=float(resource.get("max_rss_mb", 4096)),
            max_connections=max_connections,
            max_connections_per_address=int(
                resource.get("max_connections_per_address", max(1, max_connections // 4))
            ),
            max_connections_per_key=int(
                resource.get("max_connections_per_key", max(1, max_connections // 4))
            ),
            security_headers=bool(headers.get("enabled", True)),
            allow_cloud_models=bool(doc.get("allow_cloud_models", False)),
            trusted_clients=_networks(doc.get("trusted_clients")),
            connections_per_address=int(connections.get("max_per_address", 128)),
            connections_total=(
                int(connections["max_total"]) if "max_total" in connections else None
            ),
        )


#: Policy settings (dotted paths in the document) → the field of ``EffectivePolicy`` that
#: holds the value in force.
POLICY_FIELDS: dict[str, str] = {
    "ip_whitelist": "whitelist",
    "trusted_proxies": "trusted_proxies",
    "cors.allowed_origins": "allowed_origins",
    "rate_limit.rpm": "key_rpm",
    "rate_limit.burst": "key_burst",
    "ip_rate_limit.enabled": "ip_rate_enabled",
    "ip_rate_limit.rpm": "ip_rpm",
    "ip_rate_limit.burst": "ip_burst",
    "ip_blocklist.enabled": "blocklist_enabled",
    "ip_blocklist.max_failures": "max_failures",
    "ip_blocklist.block_duration_minutes": "block_minutes",
    "ip_blocklist.permanent_block_threshold": "permanent_threshold",
    "intrusion_detection.enabled": "intrusion_enabled",
    "intrusion_detection.warning_threshold": "warning_threshold",
    "intrusion_detection.score_threshold": "score_threshold",
    "honeypot.enabled": "honeypot_enabled",
    "anomaly_detection.enabled": "anomaly_enabled",
    "anomaly_detection.request_rate_threshold": "request_rate_threshold",
    "anomaly_detection.max_body_bytes": "max_body_bytes",
    "anomaly_detection.max_duration_seconds": "max_duration_s",
    "anomaly_detection.auto_block": "anomaly_auto_block",
    "resource_protection.enabled": "resource_enabled",
    "resource_protection.cpu_threshold": "cpu_threshold",
    "resource_protection.memory_threshold": "memory_threshold",
    "resource_protection.max_connections": "max_connections",
    "security_headers.enabled": "security_headers",
}


def effective_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting with the value in force on a loopback proxy and on an exposed one (the
    protections default on only when exposed), and whether the document sets it or the
    default applies."""
    loopback = EffectivePolicy.build(document, exposed=False)
    exposed = EffectivePolicy.build(document, exposed=True)
    rows = []
    for path, name in POLICY_FIELDS.items():
        node: Any = document
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        rows.append(
            {
                "setting": path,
                "loopback": _plain(getattr(loopback, name)),
                "exposed": _plain(getattr(exposed, name)),
                "source": "default" if node is None else "set",
            }
        )
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [str(v) for v in value]
    return value
