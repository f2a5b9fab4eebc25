"""``flm model-profiles list/save/delete`` and ``flm api prompts list/show/set/delete``."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli import notify_proxies, read_text_arg
from flm.cli.output import Result, pairs, table
from flm.core.errors import UsageError
from flm.core.jsondoc import parse_document
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "model-profiles", help="default parameters per engine and model", parents=[common]
    )
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("list", help="saved profiles", parents=[common])
    p.add_argument("--engine")
    p.add_argument("--model")
    p.set_defaults(handler=profiles_list)
    p = cmds.add_parser("save", help="save (or update) a profile", parents=[common])
    p.add_argument("--engine", required=True, help="engine id")
    p.add_argument("--model", required=True, help="the engine's model name")
    p.add_argument("--label", required=True)
    p.add_argument(
        "--params",
        required=True,
        metavar="F",
        help='JSON file (or - for stdin), e.g. {"temperature": 0.2}',
    )
    p.set_defaults(handler=profiles_save)
    p = cmds.add_parser("delete", help="delete a profile", parents=[common])
    p.add_argument("--id", required=True, dest="profile_id")
    p.set_defaults(handler=profiles_delete)

    api = sub.add_parser("api", help="per-API settings", parents=[common])
    api_cmds = api.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    prompts = api_cmds.add_parser(
        "prompts", help="prompt templates applied to an API", parents=[common]
    )
    pcmds = prompts.add_subparsers(dest="action", metavar="ACTION")
    p = pcmds.add_parser("list", help="templates in force", parents=[common])
    p.set_defaults(handler=prompts_list)
    for name, handler, helptext in (
        ("show", prompts_show, "one template"),
        ("delete", prompts_delete, "remove a template"),
    ):
        p = pcmds.add_parser(name, help=helptext, parents=[common])
        p.add_argument("--api-id", required=True)
        p.set_defaults(handler=handler)
    p = pcmds.add_parser(
        "set", help="set a template ({{user_message}} is the user's text)", parents=[common]
    )
    p.add_argument("--api-id", required=True, help="chat_completions or responses")
    p.add_argument("--file", metavar="F", help="template text (default: standard input)")
    p.set_defaults(handler=prompts_set)


def _svc(ctx: Context) -> Any:
    from flm.services.profiles import ProfileService

    return ProfileService(ctx.storage)


def profiles_list(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _svc(ctx).profiles(args.engine, args.model),
        text=lambda d: table(d, ["id", "engine_id", "model_id", "label", "parameters", "version"]),
    )


def profiles_save(ctx: Context, args: argparse.Namespace) -> Result:
    try:
        params = parse_document(read_text_arg(args.params))
    except ValueError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from None
    result = _svc(ctx).save_profile(args.engine, args.model, args.label, params)
    notify_proxies(ctx)
    return Result(result, text=pairs)


def profiles_delete(ctx: Context, args: argparse.Namespace) -> Result:
    result = _svc(ctx).delete_profile(args.profile_id)
    notify_proxies(ctx)
    return Result(result, text=pairs)


def prompts_list(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(
        _svc(ctx).prompts(),
        text=lambda d: table(d, ["api_id", "version", "updated_at", "template_text"]),
    )


def prompts_show(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(_svc(ctx).prompt(args.api_id), text=lambda d: d["template_text"])


def prompts_set(ctx: Context, args: argparse.Namespace) -> Result:
    result = _svc(ctx).set_prompt(args.api_id, read_text_arg(args.file))
    notify_proxies(ctx)
    return Result(result, text=pairs)


def prompts_delete(ctx: Context, args: argparse.Namespace) -> Result:
    result = _svc(ctx).delete_prompt(args.api_id)
    notify_proxies(ctx)
    return Result(result, text=pairs)
