"""``flm check [--verbose]``: database integrity, exit 1 with details on problems."""

from __future__ import annotations

import argparse
from typing import Any

from flm.cli.output import Result
from flm.core.errors import FlmError
from flm.services.context import Context


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", help="check both databases", parents=[common])
    p.add_argument("--verbose", action="store_true", help="include table row counts")
    p.set_defaults(handler=check)


def _text(data: dict[str, Any]) -> str:
    lines = []
    for name, rep in data["databases"].items():
        state = "ok" if not rep["problems"] else "PROBLEMS"
        version = f"schema {rep.get('schema_version')}/{rep.get('expected_version')}"
        lines.append(f"{name}.db  {state}  {version}  {rep.get('path', '')}")
        lines += [f"  - {p}" for p in rep["problems"]]
        for table_name, count in (rep.get("tables") or {}).items():
            lines.append(f"    {table_name}: {count}")
    if data.get("dns_secrets", {}).get("location"):
        lines.append(
            f"dns secrets: {data['dns_secrets']['profiles']} profile(s), kept in "
            f"{data['dns_secrets']['location']}"
        )
    lines += [f"warning: {w}" for w in data["warnings"]]
    return "\n".join(lines)


def check(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.services.check import run_check

    report = run_check(ctx.storage, verbose=args.verbose)
    if not report["ok"]:
        raise FlmError(
            f"{len(report['problems'])} problem(s): " + "; ".join(report["problems"]),
            code="DB_ERROR",
            details=report,
        )
    return Result(report, text=_text)
