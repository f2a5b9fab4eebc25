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
    p = cmds.add_parser("start", help="start a proxy (in the background daemon)", parents=[common])
    p.add_argument("--mode", choices=MODES, default="local-http")
    p.add_argument("--port", type=int, help="listen port (default: config proxy.port, 8080)")
    p.add_argument("--bind", help="listen address (default: config proxy.bind, 127.0.0.1)")
    p.add_argument("--acme-email", help="https-acme: contact address for the ACME account")
    p.add_argument(
        "--acme-domain",
        action="append",
        help="https-acme: a name of the certificate (repeatable; http-01: its port "
        "80 must reach --port; dns-01: may be a wildcard like *.example.org)",
    )
    p.add_argument(
        "--challenge",
        choices=("http-01", "dns-01"),
        default="http-01",
        help="https-acme challenge (default http-01; dns-01 needs --dns-profile)",
    )
    p.add_argument(
        "--dns-profile",
        metavar="NAME",
        help="dns-01: the `flm secrets dns` profile that publishes the TXT records",
    )
    p.add_argument(
        "--egress-mode",
        choices=("direct", "tor", "socks5"),
        default="direct",
        help="how remote engines, image URLs and ACME are reached (default direct)",
    )
    p.add_argument(
        "--socks5-endpoint",
        metavar="HOST:PORT",
        help="SOCKS5 proxy (tor defaults to 127.0.0.1:9050)",
    )
    p.add_argument(
        "--egress-fail-open",
        action="store_true",
        help="fall back to direct connections when the SOCKS proxy is down",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="gateway processes sharing the port (Linux, SO_REUSEPORT; default 1); above 1 "
        "needs --state-backend so that limits, blocks and revocations hold across them",
    )
    p.add_argument(
        "--state-backend",
        metavar="URL",
        help="share rate limits, blocks, keys and policy with other FLM processes through "
        "Redis: redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS); never a password here",
    )
    p.add_argument(
        "--state-password-file",
        metavar="PATH",
        help="a file (mode 0600) holding the Redis password",
    )
    p.add_argument(
        "--state-ca-file",
        metavar="PATH",
        help="rediss://: the CA certificate(s) that signed Redis's (default: the system's)",
    )
    p.add_argument(
        "--state-fail-open",
        action="store_true",
        help="while Redis is unreachable, serve on this process's own state (audited) "
        "instead of refusing requests with 503",
    )
    p.add_argument("--no-daemon", action="store_true", help="run in the foreground")
    p.set_defaults(handler=start)
    p = cmds.add_parser("stop", help="stop proxies", parents=[common])
    p.add_argument("--port", type=int)
    p.add_argument("--handle-id")
    p.add_argument("--all", action="store_true", dest="all_")
    p.set_defaults(handler=stop)
    p = cmds.add_parser("status", help="running proxies and their endpoints", parents=[common])
    p.set_defaults(handler=status)
    p = cmds.add_parser(
        "renew", help="renew TLS certificates now, without restart", parents=[common]
    )
    p.add_argument("--port", type=int, help="only the proxy on this port (default: all)")
    p.add_argument(
        "--if-due", action="store_true", help="renew only certificates within 30 days of their end"
    )
    p.set_defaults(handler=renew)
    p = cmds.add_parser("reload", help="apply policy/key/engine changes now", parents=[common])
    p.add_argument("--port", type=int)
    p.add_argument("--all", action="store_true", dest="all_")
    p.set_defaults(handler=reload)


def _config(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    import os

    from flm.services.proxy_config import ACME_MODE, StartConfig, acme_env_from

    port = args.port if args.port is not None else int(ctx.config.value("proxy.port"))
    if not 0 < port < 65536:
        raise UsageError(f"--port must be 1-65535, got {port}")
    bind = args.bind or str(ctx.config.value("proxy.bind"))
    from flm.services.settings import KNOWN

    KNOWN["proxy.bind"].parse(bind)
    config: dict[str, Any] = {
        "mode": args.mode,
        "port": port,
        "bind": bind,
        "egress_mode": args.egress_mode,
        "socks5_endpoint": args.socks5_endpoint,
        "egress_fail_open": args.egress_fail_open,
        "acme_domain": args.acme_domain,
        "acme_email": args.acme_email,
        "challenge": args.challenge,
        "dns_profile": args.dns_profile,
        "state_backend": args.state_backend,
        # (the daemon runs elsewhere: the path as this shell means it)
        "state_password_file": os.path.abspath(args.state_password_file)
        if args.state_password_file
        else None,
        "state_fail_open": args.state_fail_open,
        "state_ca_file": os.path.abspath(args.state_ca_file) if args.state_ca_file else None,
    }
    if args.workers != 1:
        config["workers"] = args.workers
    if args.mode == ACME_MODE:
        config["acme_env"] = acme_env_from(os.environ)
    StartConfig.from_dict(config)  # refuse bad combinations before the daemon starts
    return config


def _audit_text(audit: dict[str, Any] | None) -> str:
    if not audit:
        return ""
    if audit.get("failing"):
        return (
            f"FAILING since {audit['failing_since']}: {audit['last_error']} "
            f"({audit['unwritten']} unwritten)"
        )
    return f"ok ({audit['unwritten']} unwritten)"


def _state_text(state: dict[str, Any] | None) -> str:
    if not state or state.get("backend", "local") == "local":
        return "local"
    reach = "reachable" if state.get("reachable") else "UNREACHABLE"
    mode = "fail-open" if state.get("fail_open") else "fail-closed"
    return f"{state['url']} {reach} ({mode})"


def _status_text(data: dict[str, Any]) -> str:
    rows = []
    for p in data.get("proxies", []):
        egress = p.get("egress") or {}
        rows.append(
            {
                "id": p["id"] + (" (no daemon)" if p.get("foreground") else ""),
                "mode": p["mode"],
                "port": p["port"],
                "https_port": p.get("https_port") or "",
                "listen": p["listen"],
                "endpoints": " ".join(p["endpoints"]),
                "egress": egress.get("mode", "direct")
                + (" (fell back)" if egress.get("fell_back") else ""),
                "cert_expiry": p.get("certificate_expiry") or "",
                "uptime_s": p["uptime_s"],
                "pid": p["pid"],
                "audit": _audit_text(p.get("audit")),
                "state": _state_text(p.get("state")),
                "last_error": p.get("last_error") or "",
            }
        )
    if not rows:
        return "no proxy running"
    lines = [table(rows)]
    for p in data.get("proxies", []):
        for pool in p.get("pools") or []:
            members = ", ".join(
                f"{m['engine_id']} {m['state']} in_flight={m['in_flight']}" for m in pool["members"]
            )
            lines.append(f"{p['id']} pool {pool['name']}: {members}")
        workers = p.get("workers") or []
        if workers:
            lines.append(
                f"{p['id']} workers: "
                + "; ".join(
                    f"{w['index']} pid {w['pid']} {'alive' if w['alive'] else 'DOWN'}"
                    + (f" served={w['served']}" if w.get("served") is not None else "")
                    + (f" restarts={w['restarts']}" if w.get("restarts") is not None else "")
                    + (f" last_exit={w['last_exit']}" if w.get("last_exit") else "")
                    for w in workers
                )
            )
    return "\n".join(lines)


def _start_text(d: dict[str, Any]) -> str:
    lines = [_status_text({"proxies": [d]})]
    if d.get("https_port"):
        lines.append(
            f"port {d['port']} answers only with a redirect to HTTPS (port {d['https_port']})"
        )
    trust = d.get("trust")
    if trust:
        lines.append(
            f"trust FLM's root ({trust['fingerprint_sha256_root']}):\n"
            f"  {trust['trust']}\nremove it later:\n  {trust['untrust']}\n"
            f"or per client:\n  {trust['curl']}"
        )
    lines.extend(f"note: {n}" for n in d.get("notes") or [])
    return "\n".join(lines)


class _Progress:
    """A spinner with the elapsed time on stderr while the daemon works (terminals only)."""

    def __init__(self, what: str) -> None:
        import threading

        from flm.cli.output import Progress

        self.what = what
        self.progress = Progress()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        if self.progress.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.enabled:
            self.finished.set()
            self.thread.join(timeout=2)
            self.progress.done()

    def _run(self) -> None:
        import time

        started = time.monotonic()
        while not self.finished.wait(0.2):
            self.progress.update(f"{self.what} ({time.monotonic() - started:.0f} s)")


def start(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.cli.security import exposure_warnings
    from flm.services.proxy import ProxyService

    config = _config(ctx, args)
    # (the socket table is read while the proxy starts; the warnings come after)
    port = int(config["port"])
    exposure = exposure_warnings(ctx, own_ports=(port, port + 1))
    if args.no_daemon:
        from flm.proxy.foreground import run_foreground

        exposure()
        run_foreground(ctx, config)
        return Result({"stopped": True}, text=lambda d: "proxy stopped")
    what = "starting the proxy"
    if config["mode"] == "https-acme" and config["challenge"] == "dns-01":
        what = (
            f"obtaining a certificate for {', '.join(config['acme_domain'])} (ACME DNS-01 "
            f"via profile {config['dns_profile']}: TXT records, propagation, validation)"
        )
    elif config["mode"] == "https-acme":
        what = (
            f"obtaining a certificate for {', '.join(config['acme_domain'])} "
            "(ACME HTTP-01, up to 90 s)"
        )
    elif config["egress_mode"] != "direct":
        what = f"checking the {config['egress_mode']} egress"
    with _Progress(what):
        described = ProxyService(ctx.storage).start(config)
    warnings = exposure()
    if warnings:
        described["notes"] = [*(described.get("notes") or []), *warnings]
    return Result(described, text=_start_text)


def stop(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    if args.port is None and args.handle_id is None and not args.all_:
        raise UsageError("say which proxy: --port P, --handle-id ID or --all")
    result = ProxyService(ctx.storage).stop(
        port=args.port, handle_id=args.handle_id, all_=args.all_
    )
    return Result(
        result,
        text=lambda d: "\n".join(
            [
                f"stopped: {', '.join(d['stopped']) or 'none'}",
                *(f"warning: {w}" for w in d.get("warnings") or []),
            ]
        ),
    )


def status(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    return Result(ProxyService(ctx.storage).status(), text=_status_text)


def renew(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    with _Progress("renewing certificates"):
        result = ProxyService(ctx.storage).renew(args.port, force=not args.if_due)

    def text(d: dict[str, Any]) -> str:
        return (
            "\n".join(
                f"{r['id']}: {'renewed' if r['renewed'] else 'not due'}, {r['fingerprint_sha256']} "
                f"valid until {r['not_after']}"
                for r in d["renewed"]
            )
            or "nothing to renew"
        )

    return Result(result, text=text)


def reload(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.proxy import ProxyService

    result = ProxyService(ctx.storage).reload(None if args.all_ else args.port)
    return Result(result, text=lambda d: f"reloaded: {', '.join(d['reloaded']) or 'none'}")
