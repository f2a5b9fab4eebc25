"""Security events that happen outside a request (egress fallback, Tor down, ACME trouble).

One small entry point, :func:`record_security_event`, writes one ``audit_logs`` row through the
security database's single writer. Requests and per-request security events go through the
proxy's batched audit sink instead; these events are rare and must be on disk before the caller
goes on (a refused start exits right after recording why).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flm.core.jsonlog import scrub
from flm.core.timeutil import now_iso
from flm.storage import Storage
from flm.storage.records import AuditRepo

log = logging.getLogger("flm.events")

SEVERITIES = ("info", "low", "medium", "high", "critical")


def record_security_event(
    storage: Storage, event_type: str, severity: str, details: dict[str, Any] | None = None
) -> int:
    """Append one security event to ``audit_logs`` (and the log); returns the row id.

    Blocking: it waits until the row is committed. Call it from a worker thread when an event
    loop is running.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")
    body = scrub(json.dumps(details or {}, separators=(",", ":"), default=str))
    stamp = now_iso()

    row_id = AuditRepo(storage.security).insert_event(stamp, event_type, severity, body)
    from flm.core.alerts import notify

    notify(event_type, severity, "", details)
    log.warning(
        "security event %s (%s)",
        event_type,
        severity,
        extra={"event_type": event_type, "severity": severity},
    )
    return row_id
