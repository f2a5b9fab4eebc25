"""``flm models list``: every model of every usable engine, as ``flm://engine/model``."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result, run_async, table
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("models", help="list models", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("list", help="models of all usable engines", parents=[common])
    p.add_argument("--engine", metavar="ID", help="only this engine")
    p.add_argument("--fresh", action="store_true", help="probe engines again first")
    p.set_defaults(handler=list_)

    alias = cmds.add_parser(
        "alias", help="names of your choosing for flm:// model ids", parents=[common]
    )
    acmds = alias.add_subparsers(dest="alias_command", metavar="SUBCOMMAND")
    p = acmds.add_parser("set", help="create or change an alias (applied live)", parents=[common])
    p.add_argument("name", metavar="NAME", help="the name clients send, e.g. gpt-4o-mini")
    p.add_argument("target", metavar="MODEL_ID", help="flm://<engine>/<model>")
    p.set_defaults(handler=alias_set)
    p = acmds.add_parser("list", help="list aliases", parents=[common])
    p.set_defaults(handler=alias_list)
    p = acmds.add_parser("remove", help="remove an alias (applied live)", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=alias_remove)


def _text(data: dict[str, Any]) -> str:
    rows = [
        {
            "id": m["id"],
            "context": m["context_length"],
            "vision": m["capabilities"]["vision_inputs"],
            "embeddings_only": m["capabilities"]["embeddings_only"],
            "cloud": m.get("cloud", False),
        }
        for m in data["models"]
    ]
    lines = [table(rows)]
    if any(m.get("cloud") for m in data["models"]):
        lines.append(
            "cloud: the engine sends prompts for this model to a remote service; "
            "the gateway refuses it unless the policy sets allow_cloud_models"
        )
    lines += [f"{engine}: {err}" for engine, err in data["errors"].items()]
    return "\n".join(lines)


def list_(ctx: Context, args: argparse.Namespace) -> Result:
    models, errors = run_async(
        ctx.engines.alist_models(args.engine, fresh=args.fresh), "listing models"
    )
    return Result({"models": [m.to_dict() for m in models], "errors": errors}, text=_text)


def _aliases(ctx: Context) -> Any:
    from flm.services.aliases import AliasService

    return AliasService(ctx.storage)


def alias_set(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.cli import notify_proxies

    data = _aliases(ctx).set(args.name, args.target)
    notify_proxies(ctx)
    return Result(data, text=lambda d: f"alias {d['name']} -> {d['target']}")


def alias_list(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _aliases(ctx).list(), text=lambda rows: table(rows, ["name", "target", "updated_at"])
    )


def alias_remove(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.cli import notify_proxies

    data = _aliases(ctx).remove(args.name)
    notify_proxies(ctx)
    return Result(data, text=lambda d: f"alias {d['name']} removed")
