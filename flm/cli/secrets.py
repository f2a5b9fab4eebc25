"""``flm secrets dns add/list/remove``: credential profiles for ACME DNS-01.

The secret (TSIG key or API token) comes from ``--tsig-secret-file``/``--api-token-file`` (``-``
for standard input), from standard input when it is piped, or from a hidden prompt on a
terminal — never from the command line, where every local user could read it in the process
list. ``list`` shows the settings and where the secrets live, never a secret.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flm.cli.output import Result, pairs, table
from flm.core.errors import UsageError
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("secrets", help="credentials FLM keeps for you", parents=[common])
    kinds = group.add_subparsers(dest="subcommand", metavar="KIND")
    dns = kinds.add_parser(
        "dns", help="DNS-01 credential profiles (RFC 2136/TSIG, Cloudflare)", parents=[common]
    )
    cmds = dns.add_subparsers(dest="action", metavar="ACTION")
    # No abbreviations: `--tsig-secret S` must not pass as `--tsig-secret-file S`.
    p = cmds.add_parser(
        "add",
        help="add a DNS profile (the secret is read from a file or standard input)",
        parents=[common],
        allow_abbrev=False,
    )
    p.add_argument("name", help="profile name, used by `proxy start --dns-profile NAME`")
    p.add_argument("--provider", choices=("rfc2136", "cloudflare"), required=True)
    p.add_argument("--zone", required=True, help="the DNS zone holding the names, e.g. example.org")
    p.add_argument(
        "--server",
        metavar="HOST[:PORT]",
        help="rfc2136: the primary server accepting dynamic updates (port 53)",
    )
    p.add_argument("--tsig-name", help="rfc2136: the TSIG key name")
    p.add_argument(
        "--tsig-algorithm",
        default="hmac-sha256",
        help="rfc2136: hmac-sha256 (default), hmac-sha384, hmac-sha512, ...",
    )
    p.add_argument(
        "--tsig-secret-file",
        "--api-token-file",
        dest="secret_file",
        metavar="F",
        help="file holding the TSIG secret (base64) or the API token; - for "
        "standard input (the default when it is piped)",
    )
    p.add_argument(
        "--api-base",
        metavar="URL",
        help="cloudflare: API base URL (default https://api.cloudflare.com/client/v4)",
    )
    p.add_argument(
        "--check-server",
        action="append",
        dest="check_servers",
        metavar="HOST[:PORT]",
        help="a server to wait on until it answers the TXT "
        "record (repeatable; default: the zone's authoritative servers)",
    )
    p.add_argument(
        "--propagation-timeout",
        type=float,
        metavar="S",
        help="how long to wait for the TXT record to be visible (default 120 s)",
    )
    p.add_argument("--replace", action="store_true", help="replace an existing profile")
    p.set_defaults(handler=add)
    p = cmds.add_parser("list", help="list DNS profiles (never their secrets)", parents=[common])
    p.set_defaults(handler=list_)
    p = cmds.add_parser("remove", help="remove a DNS profile and its secret", parents=[common])
    p.add_argument("name")
    p.set_defaults(handler=remove)
    dns.set_defaults(handler=_need_action)
    group.set_defaults(handler=_need_kind)


def _need_kind(ctx: Context, args: argparse.Namespace) -> Result:
    raise UsageError("`flm secrets` needs a kind: `flm secrets dns add|list|remove`")


def _need_action(ctx: Context, args: argparse.Namespace) -> Result:
    raise UsageError("`flm secrets dns` needs an action: add, list or remove")


def _read_secret(path: str | None) -> str:
    if path not in (None, "-"):
        assert path is not None
        try:
            return Path(path).read_text(encoding="utf-8")
        # The path is not repeated: if a secret was typed there by mistake, it stays out of
        # the output.
        except FileNotFoundError:
            raise UsageError(
                "the file given to --tsig-secret-file/--api-token-file does not "
                "exist: give the path of a file holding the secret, or - for "
                "standard input (never the secret itself)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                "cannot read the file given to --tsig-secret-file/"
                f"--api-token-file: "
                f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
            ) from None
    if sys.stdin is None:
        raise UsageError("give the secret with --tsig-secret-file F or on standard input")
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("secret (input hidden): ")
    return sys.stdin.readline()


def add(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.dns_secrets import DnsSecretsService

    settings = {
        "zone": args.zone,
        "check_servers": args.check_servers or [],
        "propagation_timeout_s": args.propagation_timeout,
    }
    if args.provider == "rfc2136":
        settings.update(
            server=args.server, tsig_name=args.tsig_name, tsig_algorithm=args.tsig_algorithm
        )
    elif args.server or args.tsig_name:
        raise UsageError("--server and --tsig-name only apply to --provider rfc2136")
    if args.provider == "cloudflare":
        settings["api_base"] = args.api_base
    elif args.api_base:
        raise UsageError("--api-base only applies to --provider cloudflare")
    service = DnsSecretsService(ctx.storage)
    profile = service.add(
        args.name, args.provider, settings, _read_secret(args.secret_file), replace=args.replace
    )
    data = {**profile.view(), "secrets_location": service.store.describe()}
    return Result(data, text=pairs)


def list_(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.dns_secrets import DnsSecretsService

    service = DnsSecretsService(ctx.storage)
    data = {
        "profiles": [p.view() for p in service.list()],
        "secrets_location": service.store.describe(),
    }

    def text(d: dict[str, Any]) -> str:
        rows = [
            {
                "name": p["name"],
                "provider": p["provider"],
                "zone": p["zone"],
                "server": p.get("server") or p.get("api_base") or "",
                "secret_store": p["secret_store"],
            }
            for p in d["profiles"]
        ]
        body = table(rows) if rows else "no DNS profiles"
        return f"{body}\nsecrets are kept in: {d['secrets_location']}"

    return Result(data, text=text)


def remove(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.dns_secrets import DnsSecretsService

    profile = DnsSecretsService(ctx.storage).remove(args.name)
    return Result({"removed": profile.name}, text=lambda d: f"removed DNS profile {d['removed']}")
