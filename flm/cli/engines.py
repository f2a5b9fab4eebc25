"""``flm engines detect/list/add/remove`` and the managed engine's ``start/stop/install``."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result, pairs, run_async, table
from flm.engines import kinds
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("engines", help="detect, register and run engines", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("detect", help="probe engines (cached 5 min)", parents=[common])
    p.add_argument("--engine", metavar="KIND_OR_ID", help="only this kind or engine id")
    p.add_argument("--fresh", action="store_true", help="bypass the cache")
    p.set_defaults(handler=detect)
    p = cmds.add_parser("list", help="registered engines and default endpoints",
                        parents=[common])
    p.set_defaults(handler=list_)
    p = cmds.add_parser("add", help="register an engine endpoint", parents=[common])
    p.add_argument("--kind", required=True, help=kinds.help_text())
    p.add_argument("--url", required=True, help="e.g. http://gpu-box:8000")
    p.add_argument("--id", dest="engine_id", help="engine id (default: the kind, then kind-2…)")
    p.set_defaults(handler=add)
    p = cmds.add_parser("remove", help="unregister an engine", parents=[common])
    p.add_argument("engine_id", metavar="ID")
    p.set_defaults(handler=remove)
    from flm.cli import managed

    managed.register(cmds, common)


def _detect_text(data: dict[str, Any]) -> str:
    rows = [{"id": e["id"], "kind": e["kind"], "status": e["status"],
             "latency_ms": e["latency_ms"], "url": e["base_url"], "version": e["version"],
             "note": e["error"]} for e in data["engines"]]
    lines = [table(rows)]
    if data["not_found"]:
        lines.append(f"not found: {', '.join(data['not_found'])}")
    if data["cached"]:
        lines.append("(cached; use --fresh to probe again)")
    return "\n".join(lines)


def detect(ctx: Context, args: argparse.Namespace) -> Result:
    report = run_async(ctx.engines.adetect(args.engine, fresh=args.fresh), "detecting engines")
    return Result(report.to_dict(), text=_detect_text)


def list_(ctx: Context, args: argparse.Namespace) -> Result:
    rows = [{"id": e.id, "kind": e.kind.value, "base_url": e.base_url, "source": e.source}
            for e in ctx.engines.endpoints()]
    return Result(rows, text=table)


def add(ctx: Context, args: argparse.Namespace) -> Result:
    row = ctx.engines.add(args.kind, args.url, args.engine_id)
    return Result(row.public(), text=pairs)


def remove(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(ctx.engines.remove(args.engine_id).public(), text=pairs)
