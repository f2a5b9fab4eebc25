"""``flm security ip-blocklist / audit-logs / intrusion / anomaly``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flm.cli import notify_proxies
from flm.cli.output import Result, pairs, table
from flm.services.context import Context


def register(cmds: Any, common: argparse.ArgumentParser) -> None:
    block = cmds.add_parser("ip-blocklist", help="blocked addresses", parents=[common])
    bcmds = block.add_subparsers(dest="action", metavar="ACTION")
    p = bcmds.add_parser("list", help="blocked addresses", parents=[common])
    p.set_defaults(handler=blocklist)
    p = bcmds.add_parser("unblock", help="unblock an address (IPv6: its /64)", parents=[common])
    p.add_argument("ip")
    p.set_defaults(handler=unblock)
    p = bcmds.add_parser(
        "clear", help="remove every temporary block (permanent ones stay)", parents=[common]
    )
    p.set_defaults(handler=clear)

    audit = cmds.add_parser("audit-logs", help="the audit trail", parents=[common])
    _filters(audit)
    audit.set_defaults(handler=audit_list)
    acmds = audit.add_subparsers(dest="action", metavar="ACTION")
    # `export` has its own --format (json|csv: the file's format); output stays JSON.
    p = acmds.add_parser("export", help="write the trail to a file")
    p.add_argument("--db-path-config", metavar="PATH", default=argparse.SUPPRESS)
    p.add_argument("--db-path-security", metavar="PATH", default=argparse.SUPPRESS)
    _filters(p, limit=None)  # (everything unless asked)
    p.add_argument("--format", dest="export_format", choices=("json", "csv"), required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(handler=audit_export)
    p = acmds.add_parser(
        "archive", help="move rows older than DATE to a JSON Lines file", parents=[common]
    )
    p.add_argument("--before", required=True, metavar="DATE")
    p.set_defaults(handler=audit_archive)

    p = cmds.add_parser("intrusion", help="intrusion attempts", parents=[common])
    p.add_argument("--ip")
    p.add_argument("--min-score", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=intrusion)
    p = cmds.add_parser("anomaly", help="anomaly detections", parents=[common])
    p.add_argument("--ip")
    p.add_argument("--anomaly-type")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=anomaly)


def _filters(p: argparse.ArgumentParser, limit: int | None = 100) -> None:
    p.add_argument("--event-type")
    p.add_argument("--severity")
    p.add_argument("--ip")
    p.add_argument("--since", metavar="DATE")
    p.add_argument("--limit", type=int, default=limit)
    p.add_argument("--offset", type=int, default=0)


def _svc(ctx: Context) -> Any:
    from flm.services.security_records import SecurityEvents

    return SecurityEvents(ctx.storage)


def blocklist(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _svc(ctx).blocklist(),
        text=lambda d: table(
            d, ["ip", "reason", "failure_count", "blocked_at", "expires_at", "permanent"]
        ),
    )


def unblock(ctx: Context, args: argparse.Namespace) -> Result:
    result = _svc(ctx).unblock(args.ip)
    notify_proxies(ctx)
    return Result(result, text=pairs)


def clear(ctx: Context, args: argparse.Namespace) -> Result:
    result = _svc(ctx).clear_temporary()
    notify_proxies(ctx)
    return Result(result, text=pairs)


def _filter_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "event_type": args.event_type,
        "severity": args.severity,
        "ip": args.ip,
        "since": args.since,
    }


def audit_list(ctx: Context, args: argparse.Namespace) -> Result:
    rows = _svc(ctx).audit_logs(limit=args.limit, offset=args.offset, **_filter_args(args))
    return Result(
        rows,
        text=lambda d: table(
            d,
            [
                "ts",
                "event_type",
                "severity",
                "client_ip",
                "endpoint",
                "status",
                "api_key_id",
                "request_id",
            ],
        ),
    )


def audit_export(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _svc(ctx).export(
            args.export_format,
            Path(args.output),
            limit=args.limit,
            offset=args.offset,
            **_filter_args(args),
        ),
        text=pairs,
    )


def audit_archive(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(_svc(ctx).archive(args.before), text=pairs)


def intrusion(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _svc(ctx).intrusions(ip=args.ip, min_score=args.min_score, limit=args.limit),
        text=lambda d: table(d, ["ts", "ip", "score", "total_score", "reasons", "path"]),
    )


def anomaly(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _svc(ctx).anomalies(ip=args.ip, anomaly_type=args.anomaly_type, limit=args.limit),
        text=lambda d: table(d, ["ts", "ip", "anomaly_type", "value", "threshold"]),
    )
