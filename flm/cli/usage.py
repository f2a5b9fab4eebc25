"""``flm usage``: tokens and requests per key, model, engine or hour."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result, table
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "usage", help="tokens and requests by key, model, engine or hour", parents=[common]
    )
    p.add_argument("--key", metavar="ID", help="only this key")
    p.add_argument("--model", metavar="M", help="only this model (flm://engine/model)")
    p.add_argument(
        "--since", metavar="WHEN", help="a duration back from now (24h, 7d) or a date (default 24h)"
    )
    p.add_argument("--by", choices=("key", "model", "engine", "hour"), default="key")
    p.set_defaults(handler=usage)


def usage(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.usage import UsageService

    report = UsageService(ctx.storage).report(
        key=args.key, model=args.model, since=args.since, by=args.by
    )
    columns = [
        args.by,
        *(["label"] if args.by == "key" else []),
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "estimated_requests",
    ]
    return Result(
        report, text=lambda d: table(d["rows"], columns), csv=lambda d: (d["rows"], columns)
    )
