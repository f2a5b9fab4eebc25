"""Blocklist, audit trail, intrusion and anomaly records: what ``flm security …`` reads and
changes. Changes reach running proxies through the daemon's reload."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flm.core.clients import subject
from flm.core.errors import NotFoundError, UsageError
from flm.core.paths import ensure_private_dir, write_private_file
from flm.core.timeutil import iso, now_iso, parse_iso, utc_now
from flm.storage import Storage
from flm.storage.records import AnomaliesRepo, AuditRepo, BlocklistRepo, IntrusionsRepo

SEVERITIES = ("info", "low", "medium", "high", "critical")


def _iso_arg(text: str, name: str) -> str:
    try:
        return iso(parse_iso(text))
    except ValueError:
        raise UsageError(f"{name} must be a date or ISO 8601 time, got {text!r}") from None


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 100_000:
        raise UsageError("--limit must be 1-100000")


class SecurityEvents:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @property
    def _db(self) -> Any:
        return self._storage.security

    # --- blocklist -------------------------------------------------------------------------------

    def blocklist(self) -> list[dict[str, Any]]:
        now = now_iso()
        return [
            {
                **dict(r),
                "permanent": bool(r["permanent"]),
                "active": bool(r["permanent"]) or (r["expires_at"] or "") > now,
            }
            for r in BlocklistRepo(self._db).all()
        ]

    def unblock(self, ip: str) -> dict[str, Any]:
        """Unblock an address. IPv6 clients are blocked by /64: any address in it, or the
        /64 as listed, unblocks it (with rows that name single addresses in it)."""
        target = subject(ip.strip())
        if not BlocklistRepo(self._db).remove_matching(target, subject):
            raise NotFoundError(f"{ip} is not in the blocklist", code="IP_NOT_BLOCKED")
        return {"ip": target, "unblocked": True}

    def clear_temporary(self) -> dict[str, Any]:
        return {"cleared": BlocklistRepo(self._db).clear_temporary(), "kept_permanent": True}

    # --- audit -----------------------------------------------------------------------------------

    def audit_logs(
        self,
        *,
        event_type: str | None = None,
        severity: str | None = None,
        ip: str | None = None,
        since: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Newest first; ``limit=None`` is every row (for export)."""
        if severity and severity not in SEVERITIES:
            raise UsageError(f"--severity must be one of {', '.join(SEVERITIES)}")
        since_iso = _iso_arg(since, "--since") if since else None
        if limit is not None:
            _check_limit(limit)
        if offset < 0:
            raise UsageError("--offset must be >= 0")
        rows = AuditRepo(self._db).query(
            event_type=event_type,
            severity=severity,
            ip=ip,
            since=since_iso,
            limit=limit,
            offset=offset,
        )
        out = []
        for r in rows:
            item = dict(r)
            item["details"] = json.loads(item.pop("details_json") or "null")
            out.append(item)
        return out

    def export(
        self, fmt: str, output: Path, *, limit: int | None = None, offset: int = 0, **filters: Any
    ) -> dict[str, Any]:
        """The trail (all of it, or ``limit`` rows from ``offset``) to a file. CSV cells that
        a spreadsheet would run as a formula are written as text (a leading ``'``): paths,
        user agents and engine names come from clients."""
        rows = self.audit_logs(limit=limit, offset=offset, **filters)
        if fmt == "json":
            data = json.dumps(rows, ensure_ascii=False, indent=1).encode()
        elif fmt == "csv":
            buf = io.StringIO()
            columns = list(rows[0]) if rows else ["id", "ts"]
            writer = csv.DictWriter(buf, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {
                        k: _cell(json.dumps(v) if isinstance(v, (dict, list)) else v)
                        for k, v in row.items()
                    }
                )
            data = buf.getvalue().encode()
        else:
            raise UsageError("--format must be json or csv")
        write_private_file(output, data)
        return {"file": str(output), "rows": len(rows), "format": fmt}

    def archive(self, before: str) -> dict[str, Any]:
        """Move rows older than ``before`` to a JSON Lines file, then out of the table — the
        only way rows ever leave ``audit_logs``."""
        cutoff = _iso_arg(before, "--before")
        folder = ensure_private_dir(self._storage.paths.logs_dir / "archive")
        stamp = now_iso().replace(":", "").replace("-", "")
        target = folder / f"audit-before-{cutoff[:10]}-{stamp}.jsonl"
        deleted, digest = AuditRepo(self._db).archive(cutoff, target)
        return {"archived": deleted, "file": str(target), "sha256": digest, "before": cutoff}

    def apply_retention(self, days: int, now: datetime | None = None) -> dict[str, Any] | None:
        """Archive (never delete) audit rows older than ``days``; ``None`` when there are none."""
        moment = now or utc_now()
        cutoff = iso(moment - timedelta(days=days))
        oldest = AuditRepo(self._db).oldest_ts()
        if oldest is None or oldest >= cutoff:
            return None
        return self.archive(cutoff)

    # --- intrusion / anomaly ---------------------------------------------------------------------

    def intrusions(
        self, *, ip: str | None = None, min_score: int = 0, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        _check_limit(limit)
        rows = IntrusionsRepo(self._db).query(
            ip=ip, min_score=min_score, limit=limit, offset=offset
        )
        return [{**dict(r), "reasons": json.loads(r["reasons_json"])} for r in rows]

    def anomalies(
        self,
        *,
        ip: str | None = None,
        anomaly_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        _check_limit(limit)
        rows = AnomaliesRepo(self._db).query(
            ip=ip, anomaly_type=anomaly_type, limit=limit, offset=offset
        )
        return [dict(r) for r in rows]
