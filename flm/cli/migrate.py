"""``flm migrate legacy plan|convert|apply --source DIR [--tmp DIR] [--confirm]`` (SPEC §8.1)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flm.cli.output import Result
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "migrate", help="migrate data from the earlier prototype", parents=[common]
    )
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    legacy = cmds.add_parser(
        "legacy", help="config.json + flm.db of the earlier prototype", parents=[common]
    )
    actions = legacy.add_subparsers(dest="action", metavar="ACTION")
    for name, help_text in (
        ("plan", "write migration-plan.json (what would change) to the tmp dir"),
        ("convert", "write the converted settings and proxy profiles as JSON to the tmp dir"),
        (
            "apply",
            "back up both databases, apply in one transaction, check, roll back on "
            "failure (needs --confirm)",
        ),
    ):
        p = actions.add_parser(name, help=help_text, parents=[common])
        p.add_argument(
            "--source",
            metavar="DIR",
            required=True,
            help="the prototype's data directory (config.json and flm.db, database.db or data.db)",
        )
        p.add_argument(
            "--tmp",
            metavar="DIR",
            help="where plan/convert write their files (default <data dir>/migration)",
        )
        if name == "apply":
            p.add_argument("--confirm", action="store_true", help="really apply")
        p.set_defaults(handler=_HANDLERS[name])


def _text(data: dict[str, Any]) -> str:
    counts = data["counts"]
    lines = [f"source: {data['source']} ({data['database']})"]
    lines += [f"  {k}: {v}" for k, v in counts.items()]
    lines += [f"conflict: {c}" for c in data["conflicts"]]
    lines += [f"warning: {w}" for w in data["warnings"]]
    lines.append(data["api_keys"])
    for key in ("plan_file", "settings_file", "proxy_profiles_file", "log"):
        if data.get(key):
            lines.append(f"{key.replace('_', ' ')}: {data[key]}")
    if data.get("applied"):
        lines.append("applied; backups: " + ", ".join(data["backups"].values()))
    return "\n".join(lines)


def _tmp(ctx: Context, args: argparse.Namespace) -> Path:
    return Path(args.tmp) if args.tmp else ctx.paths.home / "migration"


def plan(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services import legacy

    return Result(legacy.plan(Path(args.source), _tmp(ctx, args), ctx.paths), text=_text)


def convert(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services import legacy

    return Result(legacy.convert(Path(args.source), _tmp(ctx, args), ctx.paths), text=_text)


def apply(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services import legacy
    from flm.storage import Storage

    return Result(
        legacy.apply(Path(args.source), ctx.paths, confirm=args.confirm, storage_factory=Storage),
        text=_text,
    )


_HANDLERS = {"plan": plan, "convert": convert, "apply": apply}
