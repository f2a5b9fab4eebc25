"""``flm security …``: policy and backups (more subcommands join as the security layer grows)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flm.cli import notify_proxies, read_text_arg, trust
from flm.cli.output import Result, pairs, table
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "security", help="security policy, backups, blocklist, audit", parents=[common]
    )
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    trust.register(cmds, common)  # install-ca, uninstall-ca

    policy = cmds.add_parser("policy", help="show or replace the security policy", parents=[common])
    pcmds = policy.add_subparsers(dest="action", metavar="ACTION")
    p = pcmds.add_parser("show", help="print the policy in force", parents=[common])
    p.set_defaults(handler=policy_show)
    p = pcmds.add_parser("set", help="replace the policy (validated first)", parents=[common])
    p.add_argument("--file", metavar="F", help="JSON document (default: standard input)")
    p.set_defaults(handler=policy_set)

    backup = cmds.add_parser("backup", help="back up or restore security.db", parents=[common])
    bcmds = backup.add_subparsers(dest="action", metavar="ACTION")
    p = bcmds.add_parser(
        "create", help="write security.db.bak.<timestamp> (3 kept)", parents=[common]
    )
    p.add_argument("--output", metavar="DIR", help="folder for the backup (default backups/)")
    p.set_defaults(handler=backup_create)
    p = bcmds.add_parser("restore", help="replace security.db with a backup", parents=[common])
    p.add_argument("--file", metavar="F", required=True)
    p.set_defaults(handler=backup_restore)

    p = cmds.add_parser(
        "exposure",
        help="which engines on this machine are reachable from the network behind FLM",
        parents=[common],
    )
    p.set_defaults(handler=exposure)

    alerts = cmds.add_parser(
        "alerts", help="alert webhooks (policy section alerts)", parents=[common]
    )
    acmds = alerts.add_subparsers(dest="action", metavar="ACTION")
    p = acmds.add_parser(
        "test", help="send a sample alert to every configured webhook", parents=[common]
    )
    p.set_defaults(handler=alerts_test)

    from flm.cli import security_events

    security_events.register(cmds, common)


def policy_show(ctx: Context, args: argparse.Namespace) -> Result:
    """The stored document, and every setting as in force (defaults filled in and marked;
    loopback and exposed proxies differ where the protections default on only when
    exposed)."""
    from flm.core.policy import effective_rows

    data = ctx.policy.show()
    data["effective"] = effective_rows(data["policy"])

    def text(d: dict[str, Any]) -> str:
        rows = [
            {**r, "source": "(default)" if r["source"] == "default" else "set"}
            for r in d["effective"]
        ]
        head = f"policy: {d['source']}" + (
            f", updated {d['updated_at']}" if d["updated_at"] else ""
        )
        return head + "\n" + table(rows, ["setting", "loopback", "exposed", "source"])

    return Result(data, text=text)


def policy_set(ctx: Context, args: argparse.Namespace) -> Result:
    text = read_text_arg(args.file)
    data = ctx.policy.set_text(text)
    notify_proxies(ctx)
    return Result(data, text=lambda d: "policy saved\n" + json.dumps(d["policy"], indent=2))


def backup_create(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.backup import BackupService

    out = Path(args.output) if args.output else None
    return Result(BackupService(ctx.storage).create(out), text=pairs)


def backup_restore(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.backup import BackupService

    return Result(BackupService(ctx.storage).restore(Path(args.file)), text=pairs)


def _gateway_ports(ctx: Context) -> set[int]:
    from flm.storage.config_db import ProxyHandlesRepo

    ports = set()
    for handle in ProxyHandlesRepo(ctx.storage.config).all():
        ports.add(handle.port)
        if handle.https_port:
            ports.add(handle.https_port)
    return ports


def _record_exposed(ctx: Context, reports: list[Any]) -> None:
    """Each exposed engine becomes an ``engine_exposed`` security event."""
    from flm.services.audit_events import record_security_event
    from flm.services.exposure import EXPOSED

    for r in reports:
        if r.status == EXPOSED:
            record_security_event(
                ctx.storage,
                "engine_exposed",
                "high",
                {
                    "engine_id": r.engine_id,
                    "kind": r.kind,
                    "listen": r.listen,
                    "reachable_on": [i["address"] for i in r.reachable_on],
                    "answers_without_key": r.answers_without_key,
                },
            )


def exposure_reports(ctx: Context) -> list[Any]:
    """Audit every engine endpoint (asking each over loopback whether it answers without a
    key) and record the exposed ones."""
    from flm.services import exposure as exp

    reports = exp.audit(ctx.engines.endpoints(), flm_ports=_gateway_ports(ctx))
    _record_exposed(ctx, reports)
    return reports


def exposure_warnings(ctx: Context, *, own_ports: tuple[int, ...] = ()) -> Callable[[], list[str]]:
    """Start the exposure check for ``flm up`` and ``flm proxy start`` in the background (it
    reads the socket table only: no request goes to any engine) and return a function that
    waits for it, records exposed engines, prints one warning line each on stderr and returns
    them. ``own_ports`` are the ports the command is about to listen on. Never fails the
    command that asks."""
    import logging
    import sys
    import threading

    from flm.services import exposure as exp

    log = logging.getLogger("flm.cli")
    found: dict[str, Any] = {}
    try:
        endpoints = ctx.engines.endpoints()
        ports = _gateway_ports(ctx) | {p for p in own_ports if p}
    except Exception as exc:
        log.warning("exposure check failed: %s", exc)
        return list

    def scan() -> None:
        try:
            found["reports"] = exp.audit(endpoints, probe=False, flm_ports=ports)
        except Exception as exc:
            found["error"] = exc

    worker = threading.Thread(target=scan, name="flm-exposure", daemon=True)
    worker.start()

    def finish() -> list[str]:
        worker.join(30)
        if "reports" not in found:
            log.warning("exposure check failed: %s", found.get("error", "timed out"))
            return []
        try:
            _record_exposed(ctx, found["reports"])
        except Exception as exc:
            log.warning("could not record exposed engines: %s", exc)
        lines = exp.summary(found["reports"])
        for line in lines:
            sys.stderr.write(f"flm: {line}\n")
        sys.stderr.flush()
        return lines

    return finish


def _exposure_text(data: dict[str, Any]) -> str:
    from flm.cli.output import table

    rows = [
        {
            "engine": r["engine_id"],
            "kind": r["kind"],
            "status": r["status"],
            "listen": r["listen"],
            "reachable_on": [f"{i['address']} ({i['interface']})" for i in r["reachable_on"]],
            "keyless": r["answers_without_key"],
        }
        for r in data["engines"]
    ]
    lines = [table(rows)]
    lines += [f"fix {r['engine_id']}: {r['fix']}" for r in data["engines"] if r["fix"]]
    return "\n".join(lines)


def exposure(ctx: Context, args: argparse.Namespace) -> Result:
    reports = [r.to_dict() for r in exposure_reports(ctx)]
    data = {
        "engines": reports,
        "exposed": [r["engine_id"] for r in reports if r["status"] == "exposed"],
    }
    return Result(data, text=_exposure_text)


def alerts_test(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.core.alerts import AlertSettings
    from flm.core.errors import FlmError, UsageError
    from flm.proxy.alerts import send_test

    settings = AlertSettings.from_policy(ctx.policy.show()["policy"].get("alerts"))
    if settings is None:
        raise UsageError(
            "no alert webhooks configured: set alerts.webhooks in the security "
            "policy (`flm security policy set`)"
        )
    results = send_test(settings)
    failed = [r for r in results if not r["delivered"]]
    if failed:
        raise FlmError(
            f"{len(failed)} of {len(results)} webhook(s) did not take the test alert: "
            + "; ".join(f"{r['webhook_host']}: {r['error']}" for r in failed),
            code="ALERT_DELIVERY_FAILED",
            details={"webhooks": results},
        )
    return Result(
        {"webhooks": results},
        text=lambda d: "\n".join(
            f"{r['webhook_host']} ({r['format']}): delivered" for r in d["webhooks"]
        ),
    )
