"""Firewall scripts for publishing a proxy: ufw, firewalld, nftables, macOS pf, Windows.

Each backend yields an apply script and a rollback script that opens the proxy's ports (HTTP and
HTTPS) to the allow-list only (IPv4 and IPv6), or to everyone when the allow-list is empty. Every
value written into a script is re-parsed first (ports as integers, networks through
``ipaddress``), so nothing a user typed reaches a shell unchecked. Rules are grouped under one
name (the nftables table ``inet flm``, the pf anchor ``com.apple/flm``, the Windows rule group
``FLM``, the ufw/firewalld rule text) so the rollback removes exactly what the apply added.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flm.core.errors import UsageError
from flm.core.paths import Paths, ensure_private_dir, write_private_file
from flm.core.timeutil import utc_now

BACKENDS = ("ufw", "firewalld", "nftables", "pf", "powershell")
#: the backends this host can apply (shell scripts); pf and PowerShell are shown for other hosts
LINUX_BACKENDS = ("ufw", "firewalld", "nftables")
NFT_TABLE = "flm"
PF_ANCHOR = "com.apple/flm"
WIN_GROUP = "FLM"


@dataclass(frozen=True)
class Scripts:
    backend: str
    apply: str
    rollback: str
    #: the bare ruleset (nftables only), what ``nft -c -f`` validates
    ruleset: str | None = None

    @property
    def shell(self) -> str:
        return "powershell" if self.backend == "powershell" else "bash"


def check_ports(ports: Iterable[int | str]) -> list[int]:
    out: list[int] = []
    for p in ports:
        try:
            value = int(p)
        except (TypeError, ValueError):
            raise UsageError(f"port {p!r} is not a number") from None
        if not 0 < value < 65536:
            raise UsageError(f"port {value} is outside 1-65535")
        if value not in out:
            out.append(value)
    if not out:
        raise UsageError("at least one port is needed")
    return out


def check_networks(items: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise UsageError(f"{text!r} is not an IP address or CIDR range") from None
        if net not in out:
            out.append(net)
    return out


def _split(
    nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> tuple[list[str], list[str]]:
    return ([str(n) for n in nets if n.version == 4], [str(n) for n in nets if n.version == 6])


def _header(title: str) -> str:
    return f"#!/usr/bin/env bash\n# {title}\nset -euo pipefail\n"


def nftables(
    ports: Sequence[int], nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Scripts:
    v4, v6 = _split(nets)
    plist = ", ".join(str(p) for p in ports)
    rules = []
    if nets:
        if v4:
            rules.append(f"        tcp dport {{ {plist} }} ip saddr {{ {', '.join(v4)} }} accept")
        if v6:
            rules.append(f"        tcp dport {{ {plist} }} ip6 saddr {{ {', '.join(v6)} }} accept")
        rules.append('        iif "lo" accept')
        rules.append(f"        tcp dport {{ {plist} }} drop")
    else:
        rules.append(f"        tcp dport {{ {plist} }} accept")
    ruleset = (
        f"table inet {NFT_TABLE}\n"
        f"delete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        + "\n".join(rules)
        + "\n    }\n}\n"
    )
    apply = (
        _header("FLM: open the proxy ports to the allow-list (nftables)")
        + "nft -f - <<'FLM_NFT'\n"
        + ruleset
        + "FLM_NFT\n"
    )
    rollback = (
        _header("FLM: remove the rules added by the apply script (nftables)")
        + f"nft list table inet {NFT_TABLE} >/dev/null 2>&1 && "
        f"nft delete table inet {NFT_TABLE} || true\n"
    )
    return Scripts("nftables", apply, rollback, ruleset)


def ufw(
    ports: Sequence[int], nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Scripts:
    rules: list[str] = []
    for port in ports:
        if nets:
            rules += [f"allow proto tcp from {n} to any port {port} comment 'flm'" for n in nets]
            rules.append(f"deny proto tcp from any to any port {port} comment 'flm'")
        else:
            rules.append(f"allow proto tcp from any to any port {port} comment 'flm'")
    apply = _header("FLM: open the proxy ports to the allow-list (ufw)") + "".join(
        f"ufw {r}\n" for r in rules
    )
    rollback = _header("FLM: remove the rules added by the apply script (ufw)") + "".join(
        f"ufw delete {r.removesuffix(' comment ' + chr(39) + 'flm' + chr(39))} || true\n"
        for r in rules
    )
    return Scripts("ufw", apply, rollback)


def firewalld(
    ports: Sequence[int], nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Scripts:
    args: list[str] = []
    for port in ports:
        if nets:
            for n in nets:
                family = "ipv4" if n.version == 4 else "ipv6"
                args.append(
                    f'rich-rule=\'rule family="{family}" source address="{n}" '
                    f'port port="{port}" protocol="tcp" accept\''
                )
        else:
            args.append(f"port={port}/tcp")
    apply = (
        _header("FLM: open the proxy ports to the allow-list (firewalld)")
        + "".join(f"firewall-cmd --permanent --add-{a}\n" for a in args)
        + "firewall-cmd --reload\n"
    )
    rollback = (
        _header("FLM: remove the rules added by the apply script (firewalld)")
        + "".join(f"firewall-cmd --permanent --remove-{a} || true\n" for a in args)
        + "firewall-cmd --reload\n"
    )
    return Scripts("firewalld", apply, rollback)


def pf(
    ports: Sequence[int], nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Scripts:
    plist = " ".join(str(p) for p in ports)
    if nets:
        rules = (
            f"pass in quick proto tcp from {{ {', '.join(str(n) for n in nets)} }} "
            f"to any port {{ {plist} }}\n"
            f"block in quick proto tcp from any to any port {{ {plist} }}\n"
        )
    else:
        rules = f"pass in quick proto tcp from any to any port {{ {plist} }}\n"
    apply = (
        _header("FLM: open the proxy ports to the allow-list (macOS pf)")
        + f"pfctl -a {PF_ANCHOR} -f - <<'FLM_PF'\n{rules}FLM_PF\npfctl -E\n"
    )
    rollback = (
        _header("FLM: remove the rules added by the apply script (macOS pf)")
        + f"pfctl -a {PF_ANCHOR} -F all\n"
    )
    return Scripts("pf", apply, rollback)


def powershell(
    ports: Sequence[int], nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Scripts:
    remote = ",".join(f"'{n}'" for n in nets) if nets else "'Any'"
    plist = ",".join(str(p) for p in ports)
    apply = (
        "# FLM: open the proxy ports to the allow-list (Windows, run as Administrator)\n"
        "$ErrorActionPreference = 'Stop'\n"
        f"New-NetFirewallRule -DisplayName 'FLM proxy' -Group '{WIN_GROUP}' "
        f"-Direction Inbound -Protocol TCP -LocalPort {plist} -RemoteAddress {remote} "
        "-Action Allow | Out-Null\n"
    )
    rollback = (
        "# FLM: remove the rules added by the apply script (Windows, as Administrator)\n"
        f"Remove-NetFirewallRule -Group '{WIN_GROUP}' -ErrorAction SilentlyContinue\n"
    )
    return Scripts("powershell", apply, rollback)


_MAKERS = {
    "ufw": ufw,
    "firewalld": firewalld,
    "nftables": nftables,
    "pf": pf,
    "powershell": powershell,
}


def scripts(backend: str, ports: Iterable[int | str], allow: Iterable[str]) -> Scripts:
    if backend not in _MAKERS:
        raise UsageError(f"unknown firewall {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _MAKERS[backend](check_ports(ports), check_networks(allow))


def all_scripts(ports: Iterable[int | str], allow: Iterable[str]) -> list[Scripts]:
    p, n = check_ports(ports), check_networks(allow)
    return [_MAKERS[b](p, n) for b in BACKENDS]


def apply(
    paths: Paths, chosen: Scripts, *, rollback: bool = False, timeout: float = 60.0
) -> dict[str, object]:
    """Run one Linux script as this (root) process; the script, its output and exit status go
    to ``logs/security/firewall-<UTC time>.log`` (0600). Refused without root privileges."""
    if chosen.backend not in LINUX_BACKENDS:
        raise UsageError(f"{chosen.backend} rules are applied on their own system; copy them")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise UsageError(
            "applying firewall rules needs root: run the script shown with sudo, "
            "or start FLM as root"
        )
    script = chosen.rollback if rollback else chosen.apply
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=timeout, check=False
    )
    log_dir = Path(paths.logs_dir) / "security"
    ensure_private_dir(log_dir)
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
    log_path = log_dir / f"firewall-{stamp}.log"
    write_private_file(
        log_path,
        (
            f"# {'rollback' if rollback else 'apply'} {chosen.backend} at {stamp}\n"
            f"{script}\n# exit status {proc.returncode}\n# stdout\n{proc.stdout}\n"
            f"# stderr\n{proc.stderr}\n"
        ).encode(),
    )
    return {
        "backend": chosen.backend,
        "rollback": rollback,
        "exit_status": proc.returncode,
        "output": (proc.stdout + proc.stderr)[-4000:],
        "log": str(log_path),
    }
