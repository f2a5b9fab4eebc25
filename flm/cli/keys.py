"""``flm api-keys create/list/revoke/rotate``. The plaintext appears only in create/rotate."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from flm.cli import notify_proxies
from flm.cli.output import Result, pairs, table
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("api-keys", help="create and manage API keys", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("create", help="create a key (shown once)", parents=[common])
    p.add_argument("--label", required=True)
    p.set_defaults(handler=create)
    p = cmds.add_parser("list", help="list keys (never their secrets)", parents=[common])
    p.set_defaults(handler=list_)
    p = cmds.add_parser("revoke", help="revoke a key", parents=[common])
    p.add_argument("id")
    p.set_defaults(handler=revoke)
    p = cmds.add_parser("rotate", help="replace a key with a new one, same label", parents=[common])
    p.add_argument("id")
    p.set_defaults(handler=rotate)


_STORE_NOTE = "Store this key now: FLM keeps only its hash and cannot show it again."


def create(ctx: Context, args: argparse.Namespace) -> Result:
    row, plaintext = ctx.keys.create(args.label)
    data = {**asdict(row), "key": plaintext}
    return Result(data, text=pairs, notes=[_STORE_NOTE])


def list_(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.keys import key_view

    rows = [key_view(r) for r in ctx.keys.list()]
    return Result(rows, text=lambda d: table(d, ["id", "label", "created_at", "status"]))


def revoke(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.keys import key_view

    view = key_view(ctx.keys.revoke(args.id))
    notify_proxies(ctx)
    return Result(view, text=pairs)


def rotate(ctx: Context, args: argparse.Namespace) -> Result:
    old, new, plaintext = ctx.keys.rotate(args.id)
    notify_proxies(ctx)
    data = {
        **asdict(new),
        "key": plaintext,
        "replaces": old.id,
        "revoked_at": None,
        "old_revoked_at": old.revoked_at,
    }
    return Result(data, text=pairs, notes=[_STORE_NOTE])
