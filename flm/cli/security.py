"""``flm security …``: policy and backups (more subcommands join as the security layer grows)."""

from __future__ import annotations

import argparse
import json
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
        rows = [{**r, "source": "(default)" if r["source"] == "default" else "set"}
                for r in d["effective"]]
        head = f"policy: {d['source']}" + (f", updated {d['updated_at']}"
                                            if d["updated_at"] else "")
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
