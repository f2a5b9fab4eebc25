"""``flm engines start/stop/install``: the managed llama.cpp engine."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flm.cli import notify_proxies
from flm.cli.output import Progress, Result, pairs
from flm.core.errors import UsageError
from flm.services.context import Context


def register(cmds: Any, common: argparse.ArgumentParser) -> None:
    p = cmds.add_parser("start", help="run a managed llama-server", parents=[common])
    p.add_argument("kind", choices=("llamacpp",))
    p.add_argument("--model", required=True, help="a GGUF file, or 'demo' for SmolLM2-135M")
    p.add_argument("--port", type=int, help="loopback port (default: a free one)")
    p.add_argument("--embeddings", action="store_true", help="enable /v1/embeddings")
    p.set_defaults(handler=start)
    p = cmds.add_parser("stop", help="stop a managed engine", parents=[common])
    p.add_argument("engine_id", metavar="ID")
    p.set_defaults(handler=stop)
    p = cmds.add_parser("install", help="install llama-server and the demo model", parents=[common])
    p.add_argument("kind", choices=("llamacpp",))
    p.set_defaults(handler=install)


def _progress() -> Any:
    progress = Progress()

    def say(message: str) -> None:
        if progress.enabled:
            progress.update(message)
        else:
            sys.stderr.write(f"flm: {message}\n")

    return say


def start(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.managed import ManagedEngines

    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError("--port must be 1-65535")
    result = ManagedEngines(ctx.storage, ctx.engines).start(
        args.model, args.port, embeddings=args.embeddings, progress=_progress()
    )
    notify_proxies(ctx)  # running proxies route to it at once
    return Result(result, text=pairs)


def stop(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.managed import ManagedEngines

    result = ManagedEngines(ctx.storage, ctx.engines).stop(args.engine_id)
    notify_proxies(ctx)
    return Result(result, text=pairs)


def install(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.engines import managed_runtime as runtime

    runtime.install_llamacpp(progress=_progress())
    found = runtime.find_llama_server()
    return Result(
        {
            "llama_server": str(found.path) if found else None,
            "demo_model": str(runtime.demo_model_path()),
        },
        text=pairs,
    )
