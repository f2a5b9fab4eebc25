"""``flm engines detect/list/add/remove`` and the managed engine's ``start/stop/install``."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli import notify_proxies
from flm.cli.output import Result, pairs, run_async, table
from flm.core.errors import UsageError
from flm.engines import kinds
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("engines", help="detect, register and run engines", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("detect", help="probe engines (cached 5 min)", parents=[common])
    p.add_argument("--engine", metavar="KIND_OR_ID", help="only this kind or engine id")
    p.add_argument("--fresh", action="store_true", help="bypass the cache")
    p.set_defaults(handler=detect)
    p = cmds.add_parser("list", help="registered engines and default endpoints", parents=[common])
    p.set_defaults(handler=list_)
    p = cmds.add_parser("add", help="register an engine endpoint", parents=[common])
    p.add_argument("--kind", required=True, help=kinds.help_text())
    p.add_argument("--url", required=True, help="e.g. http://gpu-box:8000")
    p.add_argument("--id", dest="engine_id", help="engine id (default: the kind, then kind-2…)")
    p.set_defaults(handler=add)
    p = cmds.add_parser("remove", help="unregister an engine", parents=[common])
    p.add_argument("engine_id", metavar="ID")
    p.set_defaults(handler=remove)
    pool = cmds.add_parser("pool", help="engines serving the same models, as one", parents=[common])
    pools = pool.add_subparsers(dest="pool_command", metavar="COMMAND")
    p = pools.add_parser(
        "create", help="create a pool (model id flm://pool:NAME/MODEL)", parents=[common]
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--member",
        nargs="+",
        action="extend",
        required=True,
        metavar="ID",
        help="engine id (repeat or list several)",
    )
    p.add_argument(
        "--weight",
        nargs="+",
        action="extend",
        default=[],
        metavar="ID=W",
        help="a member's relative share (default 1)",
    )
    p.set_defaults(handler=pool_create)
    p = pools.add_parser("list", help="pools and their members", parents=[common])
    p.set_defaults(handler=pool_list)
    p = pools.add_parser("remove", help="remove a pool (its engines stay)", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=pool_remove)
    from flm.cli import managed

    managed.register(cmds, common)


def _detect_text(data: dict[str, Any]) -> str:
    rows = [
        {
            "id": e["id"],
            "kind": e["kind"],
            "status": e["status"],
            "latency_ms": e["latency_ms"],
            "url": e["base_url"],
            "version": e["version"],
            "note": e["error"],
        }
        for e in data["engines"]
    ]
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
    rows = [
        {"id": e.id, "kind": e.kind.value, "base_url": e.base_url, "source": e.source}
        for e in ctx.engines.endpoints()
    ]
    return Result(rows, text=table)


def add(ctx: Context, args: argparse.Namespace) -> Result:
    known = {r.id for r in ctx.engines.registered()}
    row = ctx.engines.add(args.kind, args.url, args.engine_id)
    reused = row.id in known
    notes = [f"{row.base_url} was already registered as {row.id}: reused"] if reused else []
    if not reused:
        notify_proxies(ctx)  # running proxies route to it at once
    return Result({**row.public(), "reused": reused}, text=pairs, notes=notes)


def remove(ctx: Context, args: argparse.Namespace) -> Result:
    row = ctx.engines.remove(args.engine_id)
    notify_proxies(ctx)
    return Result(row.public(), text=pairs)


def _weights(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        engine_id, sep, text = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[engine_id] = float(text)
        except ValueError:
            raise UsageError(f"--weight takes ID=NUMBER, got {item!r}") from None
    return out


def _pool_text(rows: list[dict[str, Any]]) -> str:
    return table(
        [
            {
                "name": r["name"],
                "model_id": r["model_id"],
                "members": ", ".join(f"{m['engine_id']}(x{m['weight']:g})" for m in r["members"]),
            }
            for r in rows
        ]
    )


def pool_create(ctx: Context, args: argparse.Namespace) -> Result:
    row = ctx.engines.add_pool(args.name, list(args.member), _weights(args.weight))
    notify_proxies(ctx)
    return Result(row.public(), text=lambda d: _pool_text([d]))


def pool_list(ctx: Context, args: argparse.Namespace) -> Result:
    return Result([p.public() for p in ctx.engines.pools()], text=_pool_text)


def pool_remove(ctx: Context, args: argparse.Namespace) -> Result:
    ctx.engines.remove_pool(args.name)
    notify_proxies(ctx)
    return Result({"removed": args.name}, text=lambda d: f"removed pool {d['removed']}")
