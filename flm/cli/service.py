"""``flm service install|status|uninstall``: run the gateway at login under the service manager
(systemd user unit, launchd agent, Scheduled Task)."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result, pairs
from flm.services.context import Context

PLATFORMS = ("linux", "macos", "windows")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from flm.cli.proxy import MODES

    group = sub.add_parser(
        "service",
        help="run the gateway at login (systemd, launchd, Task Scheduler)",
        parents=[common],
    )
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser(
        "install", help="write and enable the service (restart on failure)", parents=[common]
    )
    p.add_argument("--port", type=int, help="listen port (default: config proxy.port)")
    p.add_argument("--bind", help="listen address (default: config proxy.bind, 127.0.0.1)")
    p.add_argument(
        "--mode",
        choices=[m for m in MODES if m != "https-acme"],
        default="local-http",
        help="TLS mode (https-acme needs its domain and e-mail: start it by hand)",
    )
    p.add_argument(
        "--platform", choices=PLATFORMS, help="generate for another platform (shown, not installed)"
    )
    p.add_argument(
        "--no-enable",
        action="store_true",
        help="write the file only; do not ask the service manager to start it",
    )
    p.set_defaults(handler=install)
    p = cmds.add_parser(
        "status", help="is the service installed, enabled, running", parents=[common]
    )
    p.set_defaults(handler=status)
    p = cmds.add_parser("uninstall", help="stop, disable and remove the service", parents=[common])
    p.set_defaults(handler=uninstall)


def _manager(ctx: Context, platform: str | None = None) -> Any:
    from flm.services.service import ServiceManager

    return ServiceManager(ctx.paths, platform=platform)


def _install_text(data: dict[str, Any]) -> str:
    state = "installed" if data["installed"] else "generated"
    lines = [
        f"{state}: {data['path']} ({data['platform']})",
        f"enabled: {'yes' if data['enabled'] else 'no'}",
        "",
        data["content"].rstrip(),
    ]
    lines += [f"note: {n}" for n in data["notes"]]
    return "\n".join(lines)


def install(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.service import ServiceSpec
    from flm.services.settings import _bind_address

    port = args.port if args.port is not None else int(ctx.config.value("proxy.port"))
    if not 1 <= port <= 65535:
        from flm.core.errors import UsageError

        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    bind = _bind_address(args.bind) if args.bind else str(ctx.config.value("proxy.bind"))
    spec = ServiceSpec(port=port, bind=bind, mode=args.mode, home=ctx.paths.home)
    data = _manager(ctx, args.platform).install(spec, enable=not args.no_enable)
    return Result(data, text=_install_text)


def status(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(_manager(ctx).status(), text=pairs)


def uninstall(ctx: Context, args: argparse.Namespace) -> Result:
    return Result(_manager(ctx).uninstall(), text=pairs)
