"""``flm security install-ca`` / ``uninstall-ca``: FLM's root CA in the OS trust store (SPEC §6).

Both show the plan first (certificate, SHA-256 fingerprint, files, exact commands) and carry it
out only with the rights it needs; ``--dry-run`` shows the plan and stops. Without
``--cert-path`` the root is the ``packaged-ca`` one (created on first use, like a
``packaged-ca`` proxy start would). The ``dev-selfsigned`` root goes in under its own name, so
both can be trusted side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flm.cli.output import Result
from flm.services.context import Context


def register(cmds: Any, common: argparse.ArgumentParser) -> None:
    p = cmds.add_parser("install-ca", help="trust FLM's root CA system-wide", parents=[common])
    p.add_argument(
        "--cert-path", metavar="P", help="root certificate to trust (default: the packaged-ca root)"
    )
    p.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="refuse unless the certificate has this SHA-256 fingerprint",
    )
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.set_defaults(handler=install_ca)
    p = cmds.add_parser("uninstall-ca", help="stop trusting FLM's root CA", parents=[common])
    p.add_argument(
        "--cert-path", metavar="P", help="the root to remove (default: the packaged-ca root)"
    )
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.set_defaults(handler=uninstall_ca)


def _store_name(ctx: Context, cert_path: Path) -> str:
    from flm.tls.issue import DEV_MODE
    from flm.tls.truststore import DEFAULT_STORE_NAME, DEV_STORE_NAME

    dev_root = ctx.paths.certs_dir / DEV_MODE / "ca.pem"
    try:
        same = cert_path.resolve() == dev_root.resolve()
    except OSError:
        same = False
    return DEV_STORE_NAME if same else DEFAULT_STORE_NAME


def _plan_text(d: dict[str, Any]) -> str:
    verb = "installed" if d["action"] == "install" else "removed"
    lines = [
        f"certificate: {d.get('subject') or '-'}",
        f"SHA-256:     {d.get('fingerprint_sha256') or '-'}",
        f"platform:    {d['platform']}",
    ]
    lines += [f"write:       {f}" for f in d["files_to_write"]]
    lines += [f"remove:      {f}" for f in d["files_to_remove"]]
    lines += [f"run:         {' '.join(c)}" for c in d["commands"]]
    if not d.get("installed", True):
        lines.append("nothing to remove: FLM's root is not in the trust store")
    elif d["executed"]:
        lines.append(f"done: {verb}")
    elif d["dry_run"]:
        lines.append("dry run: nothing changed")
    lines += [f"note: {n}" for n in d.get("notes") or []]
    return "\n".join(lines)


def install_ca(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.tls.truststore import install_ca as install

    expected = args.fingerprint
    if args.cert_path:
        cert = Path(args.cert_path).expanduser()
    else:
        from flm.core.paths import ensure_private_dir
        from flm.tls.issue import ensure_local_ca

        ca = ensure_local_ca(ensure_private_dir(ctx.paths.certs_dir))
        cert = ca.cert_path
        expected = expected or ca.fingerprint_sha256
    plan = install(
        cert, dry_run=args.dry_run, expected_fingerprint=expected, store_name=_store_name(ctx, cert)
    )
    return Result(plan.to_dict(), text=_plan_text)


def uninstall_ca(ctx: Context, args: argparse.Namespace) -> Result:
    from flm.tls.issue import local_ca_paths
    from flm.tls.truststore import uninstall_ca as uninstall

    cert = (
        Path(args.cert_path).expanduser()
        if args.cert_path
        else local_ca_paths(ctx.paths.certs_dir)[0]
    )
    plan = uninstall(
        cert if cert.exists() else None, dry_run=args.dry_run, store_name=_store_name(ctx, cert)
    )
    return Result(plan.to_dict(), text=_plan_text)
