"""``flm ui``: start the daemon if needed, print a one-time login link, open the browser."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ui", help="open the web UI (prints a one-time login link)", parents=[common]
    )
    p.add_argument(
        "--no-browser",
        action="store_true",
        help="only print the link (it works once, within 2 minutes)",
    )
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    service = ProxyService(ctx.storage)
    info = service.ensure_daemon()
    url = str(service.call(info, "POST", "/admin/ui-login", {})["url"])
    opened = False
    if not args.no_browser:
        import webbrowser

        try:
            opened = webbrowser.open(url)
        except webbrowser.Error:
            opened = False
    return Result(
        {"url": url, "expires_in_s": 120, "browser_opened": opened},
        text=lambda d: d["url"],
        notes=["the link works once, within 2 minutes; run `flm ui` again for a new one"],
    )
