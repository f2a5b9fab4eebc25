"""Run one engine emulator from the command line.

    python -m flm.testing.emulate ollama|vllm|lmstudio [--host 127.0.0.1] [--port 0]
        [--model NAME]... [--vision-model NAME]... [--embedding-model NAME]...
        [--delay S] [--chunk-interval S] [--stream-chunks N] [--reply-text TEXT]

Prints one JSON line ``{"kind": ..., "url": "http://127.0.0.1:PORT"}`` on stdout once it is
listening, then serves until SIGINT or SIGTERM (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence

from flm.testing.emulators import EMULATORS, Behaviour, ModelLike, ModelSpec, create_server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flm.testing.emulate",
        description="Serve an emulated LLM engine (Ollama, vLLM or LM Studio) on loopback.",
    )
    parser.add_argument("kind", choices=sorted(EMULATORS))
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="a served model (repeatable); kind guessed from the name",
    )
    parser.add_argument(
        "--vision-model",
        action="append",
        default=[],
        metavar="NAME",
        help="a served model that accepts images (repeatable)",
    )
    parser.add_argument(
        "--embedding-model",
        action="append",
        default=[],
        metavar="NAME",
        help="a served embedding-only model (repeatable)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds before every response's headers",
    )
    parser.add_argument(
        "--chunk-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds between streamed frames",
    )
    parser.add_argument(
        "--stream-chunks",
        type=int,
        default=Behaviour.stream_chunks,
        metavar="N",
        help="content frames per streamed reply",
    )
    parser.add_argument(
        "--reply-text",
        default=None,
        metavar="TEXT",
        help="fixed assistant text (default: echo the last user message)",
    )
    return parser


async def serve(args: argparse.Namespace) -> None:
    models: list[ModelLike] = list(args.model)
    models += [ModelSpec(name, vision=True) for name in args.vision_model]
    models += [ModelSpec(name, embeddings=True, arch="nomic-bert") for name in args.embedding_model]
    behaviour = Behaviour(
        delay_s=args.delay,
        chunk_interval_s=args.chunk_interval,
        stream_chunks=args.stream_chunks,
        reply_text=args.reply_text,
    )
    server = create_server(args.kind, models or None, behaviour)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises instead
            loop.add_signal_handler(signum, stop.set)
    url = await server.start(args.host, args.port)
    try:
        sys.stdout.write(json.dumps({"kind": args.kind, "url": url}) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
