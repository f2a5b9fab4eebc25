"""``flm api-keys create/update/list/revoke/rotate``. The plaintext appears only in
create/rotate."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli import notify_proxies
from flm.cli.output import Result, pairs, table
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("api-keys", help="create and manage API keys", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("create", help="create a key (shown once)", parents=[common])
    p.add_argument("--label", required=True)
    _limit_options(p, update=False)
    p.set_defaults(handler=create)
    p = cmds.add_parser(
        "update", help="change a key's models, limits or expiry (at once)", parents=[common]
    )
    p.add_argument("id")
    _limit_options(p, update=True)
    p.set_defaults(handler=update)
    p = cmds.add_parser("list", help="list keys (never their secrets)", parents=[common])
    p.set_defaults(handler=list_)
    p = cmds.add_parser("revoke", help="revoke a key", parents=[common])
    p.add_argument("id")
    p.set_defaults(handler=revoke)
    p = cmds.add_parser("rotate", help="replace a key with a new one, same label", parents=[common])
    p.add_argument("id")
    p.set_defaults(handler=rotate)


def _limit_options(p: argparse.ArgumentParser, *, update: bool) -> None:
    clear = " (0 removes the limit)" if update else ""
    p.add_argument(
        "--models",
        nargs="+",
        metavar="PATTERN",
        help="models the key may use: flm://engine/model ids or globs such as "
        "flm://ollama/*"
        + (" ('--models all' lifts the restriction)" if update else " (default: all)"),
    )
    p.add_argument("--rpm", type=int, metavar="N", help="requests per minute" + clear)
    p.add_argument(
        "--burst",
        type=int,
        metavar="N",
        help="requests allowed at once above the rpm pace (default: rpm)" + clear,
    )
    p.add_argument("--tpm", type=int, metavar="N", help="tokens per minute" + clear)
    p.add_argument("--daily-tokens", type=int, metavar="N", help="tokens per UTC day" + clear)
    p.add_argument("--daily-requests", type=int, metavar="N", help="requests per UTC day" + clear)
    p.add_argument(
        "--expires",
        metavar="WHEN",
        help="30d, 12h, 2w from now, or a date/ISO datetime (UTC)"
        + ("; 'never' removes the expiry" if update else ""),
    )
    if update:
        ro = p.add_mutually_exclusive_group()
        ro.add_argument(
            "--read-only",
            dest="read_only",
            action="store_true",
            default=None,
            help="the key may only list models",
        )
        ro.add_argument(
            "--read-write", dest="read_only", action="store_false", help="lift --read-only"
        )
    else:
        p.add_argument(
            "--read-only", action="store_true", default=None, help="the key may only list models"
        )


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    models = args.models
    if models is not None and [m.strip() for m in models] == ["all"]:
        models = []
    return {
        "models": models,
        "rpm": args.rpm,
        "burst": args.burst,
        "tpm": args.tpm,
        "daily_tokens": args.daily_tokens,
        "daily_requests": args.daily_requests,
        "expires": args.expires,
        "read_only": args.read_only,
    }


_LIST_COLUMNS = ["id", "label", "status", "models", "limits", "expires_at", "last_used_at", "today"]


def _list_text(rows: list[dict[str, Any]]) -> str:
    shown = []
    for r in rows:
        limits = ", ".join(
            f"{name}={r[name]}"
            for name in ("rpm", "burst", "tpm", "daily_tokens", "daily_requests")
            if r.get(name) is not None
        )
        if r.get("read_only"):
            limits = ", ".join(x for x in ("read-only", limits) if x)
        today = r.get("today") or {}
        shown.append(
            {
                **r,
                "models": r.get("models") or "all",
                "limits": limits or None,
                "today": f"{today.get('requests', 0)} req, {today.get('tokens', 0)} tok",
            }
        )
    return table(shown, _LIST_COLUMNS)


_STORE_NOTE = "Store this key now: FLM keeps only its hash and cannot show it again."


def create(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.api_keys import build_limits, key_view

    row, plaintext = ctx.keys.create(args.label, build_limits(**_changes(args)))
    notify_proxies(ctx)  # (a proxy on a shared state backend shares the key at once)
    data = {**key_view(row), "key": plaintext}
    return Result(data, text=pairs, notes=[_STORE_NOTE])


def update(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.api_keys import key_view

    view = key_view(ctx.keys.update(args.id, **_changes(args)))
    notify_proxies(ctx)
    return Result(view, text=pairs)


def list_(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.api_keys import key_view

    today = ctx.keys.today()
    rows = [key_view(r, today) for r in ctx.keys.list()]
    return Result(rows, text=_list_text)


def revoke(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.api_keys import key_view

    view = key_view(ctx.keys.revoke(args.id))
    notify_proxies(ctx)
    return Result(view, text=pairs)


def rotate(ctx: Context, args: argparse.Namespace) -> Result:
    old, new, plaintext = ctx.keys.rotate(args.id)
    notify_proxies(ctx)
    from flm.services.api_keys import key_view

    data = {
        **key_view(new),
        "key": plaintext,
        "replaces": old.id,
        "revoked_at": None,
        "old_revoked_at": old.revoked_at,
    }
    return Result(data, text=pairs, notes=[_STORE_NOTE])
