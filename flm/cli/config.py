"""``flm config get/set/list``."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result, pairs, table
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("config", help="read and change settings", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("get", help="show one setting", parents=[common])
    p.add_argument("key")
    p.set_defaults(handler=get)
    p = cmds.add_parser("set", help="change one setting", parents=[common])
    p.add_argument("key")
    p.add_argument("value")
    p.set_defaults(handler=set_)
    p = cmds.add_parser("list", help="all settings with their values", parents=[common])
    p.set_defaults(handler=list_)


def get(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(ctx.config.get(args.key), text=lambda d: str(d["value"]))


def set_(ctx: Context, args: argparse.Namespace) -> Result:
    result = ctx.config.set(args.key, args.value)
    if args.key == "log.level":
        from flm.cli import notify_proxies

        notify_proxies(ctx)  # running proxies apply it at once
    return Result(result, text=pairs)


def list_(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(ctx.config.list(), text=lambda d: table(d, ["key", "value", "source"]))
