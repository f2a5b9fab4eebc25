"""``flm up``: one command from nothing to a working, authenticated endpoint (SPEC §3.3)."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from flm.cli.output import Result
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "up", help="detect engines, start what is missing, print URL and key", parents=[common]
    )
    p.add_argument("--port", type=int, help="proxy port (default: config proxy.port, 8080)")
    p.add_argument("--bind", help="listen address (default 127.0.0.1)")
    p.add_argument(
        "--model",
        default="demo",
        help="GGUF for the managed engine when none is running (default: demo)",
    )
    p.set_defaults(handler=up)


def _say(message: str) -> None:
    sys.stderr.write(f"flm: {message}\n")
    sys.stderr.flush()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def curl_line(url: str, model: str, key: str | None) -> str:
    """A ``curl`` command that works pasted into a POSIX shell: the new key quoted as it is,
    or ``$FLM_API_KEY`` in double quotes so that the shell expands it."""
    import json
    import shlex

    auth = (
        shlex.quote(f"Authorization: Bearer {key}")
        if key
        else '"Authorization: Bearer $FLM_API_KEY"'
    )
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    return (
        f"curl -s {shlex.quote(url + '/v1/chat/completions')} -H {auth} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _text(data: dict[str, Any]) -> str:
    lines = [
        f"FLM is up: {data['url']}",
        f"engine: {data['engine']} ({data['engine_status']})",
        f"model:  {data['model']}",
    ]
    if data.get("key"):
        lines += [f"API key (shown once, store it now): {data['key']}"]
    else:
        lines += [
            "API key: use one you created before, as FLM_API_KEY (`flm api-keys create "
            "--label NAME` makes a new one)"
        ]
    lines += ["try it:", f"  {data['curl']}"]
    lines += [f"note: {n}" for n in data["notes"]]
    return "\n".join(lines)


def up(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.managed import ManagedEngines
    from flm.services.proxy import ProxyService

    notes: list[str] = []
    _say("detecting engines")
    report = ctx.engines.detect(fresh=True)
    usable = [e for e in report.engines if e.status.usable]
    if usable:
        engine = usable[0]
        engine_id, engine_status = engine.id, engine.status.value
        _say(f"using {engine_id} at {engine.base_url} ({engine_status})")
    else:
        _say("no engine running: starting the managed llama.cpp engine with the demo model")
        started = ManagedEngines(ctx.storage, ctx.engines).start(args.model, progress=_say)
        engine_id, engine_status = started["id"], "RunningHealthy (managed)"
    models, _errors = ctx.engines.list_models(engine_id)
    model = models[0].flm_id if models else f"flm://{engine_id}/<model>"

    proxies = ProxyService(ctx.storage)
    running = proxies.status()["proxies"]
    if running:
        proxy = running[0]
        _say(f"a proxy is already running on port {proxy['port']}")
        proxies.reload()
    else:
        port = args.port if args.port is not None else int(ctx.config.value("proxy.port"))
        bind = args.bind or str(ctx.config.value("proxy.bind"))
        first = port
        while not _port_free(bind, port) and port < first + 50:
            port += 1
        if port != first:
            notes.append(f"port {first} was busy, so the proxy uses {port}")
            _say(notes[-1])
        proxy = proxies.start({"mode": "local-http", "port": port, "bind": bind})
    from flm.cli.security import exposure_warnings

    notes.extend(exposure_warnings(ctx)())
    key = None
    if ctx.keys.list() and any(k.revoked_at is None for k in ctx.keys.list()):
        pass
    else:
        _row, key = ctx.keys.create("flm up")
    url = proxy["endpoints"][0]
    curl = curl_line(url, model, key)
    data = {
        "url": url,
        "base_url": f"{url}/v1",
        "engine": engine_id,
        "engine_status": engine_status,
        "model": model,
        "key": key,
        "curl": curl,
        "proxy": proxy,
        "notes": notes,
    }
    return Result(data, text=_text)
