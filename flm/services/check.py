"""``flm check``: schema version, integrity, policy validity and orphaned handles."""

from __future__ import annotations

import json
from typing import Any

from flm.core.errors import FlmError, PolicyInvalidError
from flm.core.policy import validate_policy
from flm.services.runstate import pid_alive
from flm.storage import Storage
from flm.storage.config_db import ProxyHandlesRepo
from flm.storage.db import Database
from flm.storage.files import table_counts
from flm.storage.security import PolicyRepo


def _db_report(db: Database, verbose: bool) -> dict[str, Any]:
    report: dict[str, Any] = {
        "path": str(db.path),
        "schema_version": db.schema_version,
        "expected_version": db.expected_version,
        "safe_mode": db.safe_mode.message() if db.safe_mode else None,
        "problems": [],
    }
    if db.read_only is not None:
        report["read_only"] = db.read_only  # (said, not a problem: reads work)
    elif db.safe_mode is not None:
        report["problems"].append(db.safe_mode.message())
    elif db.schema_version != db.expected_version:
        report["problems"].append(
            f"schema version {db.schema_version}, expected {db.expected_version}"
        )
    report["problems"].extend(db.integrity_problems())
    if verbose:
        report["tables"] = table_counts(db)
    return report


def run_check(storage: Storage, *, verbose: bool = False) -> dict[str, Any]:
    databases: dict[str, Any] = {}
    warnings: list[str] = []
    for name in ("config", "security"):
        try:
            db = storage.config if name == "config" else storage.security
            databases[name] = _db_report(db, verbose)
        except FlmError as exc:
            databases[name] = {"problems": [exc.message]}

    if "safe_mode" in databases["security"]:
        try:
            stored = PolicyRepo(storage.security).get()
            if stored is not None:
                validate_policy(json.loads(stored[0]))
            databases["security"]["policy"] = "valid" if stored else "default (none stored)"
        except (PolicyInvalidError, ValueError) as exc:
            databases["security"]["problems"].append(f"stored policy is invalid: {exc}")

    if "safe_mode" in databases["config"]:
        orphaned = [
            {"id": h.id, "pid": h.pid, "port": h.port}
            for h in ProxyHandlesRepo(storage.config).all()
            if not pid_alive(h.pid)
        ]
        databases["config"]["orphaned_handles"] = orphaned
        # A handle left by a killed daemon is stale bookkeeping, not damage: it is reported and
        # cleaned by the next `flm proxy status`/`start`, and does not fail the check.
        for h in orphaned:
            warnings.append(
                f"config: orphaned proxy handle {h['id']} (pid {h['pid']} is gone, "
                f"port {h['port']})"
            )

    warnings.extend(
        f"{name}: {rep['read_only']}" for name, rep in databases.items() if rep.get("read_only")
    )
    problems = [f"{name}: {p}" for name, rep in databases.items() for p in rep["problems"]]
    report = {
        "ok": not problems,
        "databases": databases,
        "problems": problems,
        "warnings": warnings,
    }
    if "safe_mode" in databases["security"]:
        report["dns_secrets"] = _dns_secrets(storage, warnings)
    return report


def _dns_secrets(storage: Storage, warnings: list[str]) -> dict[str, Any]:
    """Where DNS-01 secrets are kept, and whether every profile's secret is still there."""
    from flm.services.dns_secrets import DnsSecretsService

    service = DnsSecretsService(storage)
    try:
        profiles = service.list()
        location = service.store.describe()
    except FlmError as exc:
        warnings.append(f"dns secrets: {exc.message}")
        return {"problems": [exc.message]}
    for profile in profiles:
        try:
            service.secret(profile)
        except FlmError as exc:
            warnings.append(f"dns profile {profile.name}: {exc.message}")
    return {"location": location, "profiles": len(profiles)}
