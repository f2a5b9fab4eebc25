"""The ``flm`` command line: one module per command group. Output is text for a person when
standard output is a terminal and JSON (SPEC §8's contract) otherwise; ``--format`` and
``FLM_FORMAT`` override.

Only argparse is imported to build the parser; each handler imports what it needs, so
``flm --help`` and ``flm config get`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
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
    "api_keys",
    "security",
    "secrets",
    "profiles",
    "check",
    "completion",
    "migrate",
    "service",
    "usage",
    "ui",
)

log = logging.getLogger("flm.cli")


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors through FLM's error contract instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match is not None:
            import difflib

            word = match["word"]
            choices = [c.strip().strip("'\"") for c in match["choices"].split(",")]
            near = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
            if match["arg"].isupper():  # a subcommand (COMMAND, SUBCOMMAND, ACTION)
                hint = f"; did you mean `{self.prog} {near[0]}`?" if near else ""
                raise UsageError(
                    f"`{self.prog} {word}` is not a command{hint} (see `{self.prog} --help`)"
                )
            if near:
                message = f"{message}; did you mean {near[0]!r}?"
        raise UsageError(f"{message} (see `{self.prog} --help`)")


_INVALID_CHOICE = re.compile(
    r"argument (?P<arg>[^:]+): invalid choice: '?(?P<word>[^'\s]*)'? "
    r"\(choose from (?P<choices>.*)\)"
)


def common_options() -> argparse.ArgumentParser:
    """Options accepted before or after any subcommand."""
    common = Parser(add_help=False)
    common.add_argument(
        "--format",
        choices=("json", "text", "csv"),
        default=argparse.SUPPRESS,
        help="output format (default: text on a terminal, json otherwise, or $FLM_FORMAT; "
        "csv for tables such as flm usage)",
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
        epilog="Output is text on a terminal and JSON "
        '({"version": "1.0", "data": ...}) when piped; --format or $FLM_FORMAT chooses. '
        "Data directory: $FLM_HOME or ~/.config/flm.",
    )
    parser.add_argument("--version", action="version", version=f"flm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"flm.cli.{name}")
        module.register(sub, common)
    from flm.cli.examples import add_examples

    add_examples(parser)
    return parser


FORMATS = ("json", "text")


def _format_of(argv: Sequence[str]) -> str:
    """The output format, read leniently so parse errors are rendered the right way too:
    ``--format``, else ``$FLM_FORMAT``, else text when standard output is a terminal and
    JSON when it is a pipe or a file."""
    for i, arg in enumerate(argv):
        value = (
            argv[i + 1]
            if arg == "--format" and i + 1 < len(argv)
            else (arg.split("=", 1)[1] if arg.startswith("--format=") else None)
        )
        if value in FORMATS:  # (audit-logs export has a --format csv of its own)
            return value
    env = os.environ.get("FLM_FORMAT", "").strip().lower()
    if env in FORMATS:
        return env
    try:
        return "text" if sys.stdout.isatty() else "json"
    except (AttributeError, ValueError):
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
        fmt = getattr(args, "format", fmt)
        handler = getattr(args, "handler", None)
        if handler is None:
            if args.command is None:  # bare `flm`: what it can do
                sys.stdout.write(parser.format_help())
                sys.stdout.flush()
                return 0
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
    for token in sorted({t for t in argv if t and not t.startswith("-")}, key=len, reverse=True):
        if token not in ("secrets", "dns", "add", "list", "remove"):
            message = message.replace(token, "<hidden>")
    for token in argv:
        if token.startswith("--") and "=" in token:
            message = message.replace(token, token.split("=", 1)[0] + "=<hidden>")
    return message


#: What a command reads from ``--file`` or standard input at most (a policy, a prompt template,
#: model parameters are all far smaller): a bigger input is refused before it is parsed.
MAX_INPUT_BYTES = 4 * 1024 * 1024


def read_text_arg(path: str | None, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """Read ``--file PATH`` (``-`` or absent = stdin) with clear errors; at most ``max_bytes``
    (a bigger input is refused without being read whole)."""
    where = "standard input" if path in (None, "-") else str(path)
    if path in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("give --file PATH or pipe the document on standard input")
        if hasattr(sys.stdin, "buffer"):
            raw: bytes | str = sys.stdin.buffer.read(max_bytes + 1)
        else:
            raw = sys.stdin.read(max_bytes + 1)
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise UsageError(f"file not found: {path}") from None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
    if len(raw) > max_bytes:
        raise UsageError(
            f"{where} is larger than {max_bytes // (1024 * 1024)} MiB, the most "
            "a command reads; nothing was changed"
        )
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text: {exc}") from None


def notify_proxies(ctx: Any) -> None:
    """Running proxies pick up key, policy, blocklist and profile changes at once (not at the
    next periodic reload)."""
    from flm.services.proxy import ProxyService

    ProxyService(ctx.storage).notify_reload()
