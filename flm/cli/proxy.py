"""``flm proxy start/stop/status/reload``."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result, table
from flm.core.errors import UsageError
from flm.services.context import Context

MODES = ("local-http", "dev-selfsigned", "packaged-ca", "https-acme")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("proxy", help="run the gateway", parents=[common])
    cmds = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p = cmds.add_parser("start", help="start a proxy (in the background daemon)",
                        parents=[common])
    p.add_argument("--mode", choices=MODES, default="local-http")
    p.add_argument("--port", type=int, help="listen port (default: config proxy.port, 8080)")
    p.add_argument("--bind", help="listen address (default: config proxy.bind, 127.0.0.1)")
    p.add_argument("--acme-email")
    p.add_argument("--acme-domain")
    p.add_argument("--challenge", choices=("http-01", "dns-01"), default="http-01")
    p.add_argument("--egress-mode", choices=("direct", "tor", "socks5"), default="direct")
    p.add_argument("--socks5-endpoint", metavar="HOST:PORT")
    p.add_argument("--egress-fail-open", action="store_true")
    p.add_argument("--no-daemon", action="store_true", help="run in the foreground")
    p.set_defaults(handler=start)
    p = cmds.add_parser("stop", help="stop proxies", parents=[common])
    p.add_argument("--port", type=int)
    p.add_argument("--handle-id")
    p.add_argument("--all", action="store_true", dest="all_")
    p.set_defaults(handler=stop)
    p = cmds.add_parser("status", help="running proxies and their endpoints", parents=[common])
    p.set_defaults(handler=status)
    p = cmds.add_parser("reload", help="apply policy/key/engine changes now", parents=[common])
    p.add_argument("--port", type=int)
    p.add_argument("--all", action="store_true", dest="all_")
    p.set_defaults(handler=reload)


def _config(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if args.mode != "local-http":
        raise UsageError(f"--mode {args.mode} is not available yet; use --mode local-http",
                         code="PROXY_INVALID_CONFIG")
    if args.egress_mode != "direct":
        raise UsageError("--egress-mode other than direct is not available yet",
                         code="PROXY_INVALID_CONFIG")
    port = args.port if args.port is not None else int(ctx.config.value("proxy.port"))
    if not 0 < port < 65536:
        raise UsageError(f"--port must be 1-65535, got {port}")
    bind = args.bind or str(ctx.config.value("proxy.bind"))
    from flm.services.config import KNOWN

    KNOWN["proxy.bind"].parse(bind)
    return {"mode": args.mode, "port": port, "bind": bind, "egress_mode": args.egress_mode}


def _status_text(data: dict[str, Any]) -> str:
    rows = [{"id": p["id"], "mode": p["mode"], "port": p["port"], "listen": p["listen"],
             "endpoints": p["endpoints"], "uptime_s": p["uptime_s"], "pid": p["pid"]}
            for p in data.get("proxies", [])]
    return table(rows) if rows else "no proxy running"


def start(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    config = _config(ctx, args)
    if args.no_daemon:
        from flm.proxy.foreground import run_foreground

        run_foreground(ctx, config)
        return Result({"stopped": True}, text=lambda d: "proxy stopped")
    described = ProxyService(ctx.storage).start(config)
    return Result(described, text=lambda d: _status_text({"proxies": [d]}))


def stop(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    if args.port is None and args.handle_id is None and not args.all_:
        raise UsageError("say which proxy: --port P, --handle-id ID or --all")
    result = ProxyService(ctx.storage).stop(port=args.port, handle_id=args.handle_id,
                                            all_=args.all_)
    return Result(result, text=lambda d: f"stopped: {', '.join(d['stopped']) or 'none'}")


def status(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    return Result(ProxyService(ctx.storage).status(), text=_status_text)


def reload(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    result = ProxyService(ctx.storage).reload(None if args.all_ else args.port)
    return Result(result, text=lambda d: f"reloaded: {', '.join(d['reloaded']) or 'none'}")
