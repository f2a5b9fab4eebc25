"""The ``flm`` command line: one module per command group, JSON out by default (SPEC §8).

Only argparse is imported to build the parser; each handler imports what it needs, so
``flm --help`` and ``flm config get`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from flm import __version__
from flm.cli.output import Result, emit, emit_error
from flm.core.errors import FlmError, InternalError, UsageError

#: Command groups, each a module in this package with ``register(subparsers, common)``.
COMMAND_MODULES = (
    "up",
    "engines",
    "models",
    "proxy",
    "chat",
    "config",
    "keys",
    "security",
    "secrets",
    "profiles",
    "check",
    "usage",
)

log = logging.getLogger("flm.cli")


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors through FLM's error contract instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def common_options() -> argparse.ArgumentParser:
    """Options accepted before or after any subcommand."""
    common = Parser(add_help=False)
    common.add_argument(
        "--format",
        choices=("json", "text", "csv"),
        default=argparse.SUPPRESS,
        help="output format (default json; csv for tables such as flm usage)",
    )
    common.add_argument(
        "--db-path-config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="use this config.db instead of the one in the data directory",
    )
    common.add_argument(
        "--db-path-security",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="use this security.db instead of the one in the data directory",
    )
    return common


def build_parser() -> Parser:
    common = common_options()
    parser = Parser(
        prog="flm",
        parents=[common],
        description="Publish the LLM engines on this machine as one safe, OpenAI-compatible API.",
        epilog='Output is JSON ({"version": "1.0", "data": ...}) unless --format text. '
        "Data directory: $FLM_HOME or ~/.config/flm.",
    )
    parser.add_argument("--version", action="version", version=f"flm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"flm.cli.{name}")
        module.register(sub, common)
    return parser


def _format_of(argv: Sequence[str]) -> str:
    """The requested format, read leniently so parse errors are rendered the right way too."""
    for i, arg in enumerate(argv):
        if arg == "--format" and i + 1 < len(argv):
            return "text" if argv[i + 1] == "text" else "json"
        if arg.startswith("--format="):
            return "text" if arg.split("=", 1)[1] == "text" else "json"
    return "json"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    fmt = _format_of(args_list)
    from flm.core.jsonlog import setup_logging

    setup_logging()
    ctx = None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(args_list)
        except UsageError as exc:
            if "secrets" in args_list[:3]:
                # A secret typed on the command line by mistake is not repeated in the error.
                raise UsageError(_redact_values(exc.message, args_list)) from None
            raise
        fmt = getattr(args, "format", "json")
        handler = getattr(args, "handler", None)
        if handler is None:
            if args.command is None:
                raise UsageError("a command is required (see `flm --help`)")
            raise UsageError(
                f"`flm {args.command}` needs a subcommand (see `flm {args.command} --help`)"
            )
        from flm.core.paths import Paths
        from flm.services.context import Context

        paths = Paths.resolve(
            config_db=getattr(args, "db_path_config", None),
            security_db=getattr(args, "db_path_security", None),
        )
        ctx = Context(paths)
        result: Result = handler(ctx, args)
        emit(result, fmt)
        return result.exit_code
    except FlmError as exc:
        emit_error(exc, fmt)
        return exc.exit_code
    except KeyboardInterrupt:
        emit_error(FlmError("interrupted", code="INTERRUPTED"), fmt)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `flm ... | head`); nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        emit_error(
            FlmError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), code="IO_ERROR"),
            fmt,
        )
        return 2
    except Exception as exc:
        log.error("internal error: %s", type(exc).__name__, exc_info=True)
        emit_error(
            InternalError(
                f"internal error ({type(exc).__name__}: {exc}); set FLM_DEBUG=1 for details"
            ),
            fmt,
        )
        return 2
    finally:
        if ctx is not None:
            ctx.close()


def _redact_values(message: str, argv: Sequence[str]) -> str:
    """``message`` with every command-line value (not option names) replaced by ``<hidden>``."""
    for token in sorted({t for t in argv if t and not t.startswith("-")}, key=len,
                        reverse=True):
        if token not in ("secrets", "dns", "add", "list", "remove"):
            message = message.replace(token, "<hidden>")
    for token in argv:
        if token.startswith("--") and "=" in token:
            message = message.replace(token, token.split("=", 1)[0] + "=<hidden>")
    return message


def read_text_arg(path: str | None) -> str:
    """Read ``--file PATH`` (``-`` or absent = stdin) with clear errors."""
    if path in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("give --file PATH or pipe the document on standard input")
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(raw, str):
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"standard input is not UTF-8 text: {exc}") from None
    assert path is not None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def notify_proxies(ctx: Any) -> None:
    """Running proxies pick up key, policy, blocklist and profile changes at once (not at the
    next periodic reload)."""
    from flm.services.proxy import ProxyService

    ProxyService(ctx.storage).notify_reload()
