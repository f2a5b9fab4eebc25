"""The publish wizard's firewall scripts: valid shell, valid nftables, and (as root, inside a
private network namespace) an apply that the rollback undoes exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flm.core.errors import UsageError
from flm.core.paths import Paths
from flm.ui import firewall

PORTS = [8080, 8081]
ALLOW = ["192.168.10.0/24", "2001:db8:42::/48"]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing in CI (scripts/system-packages.txt)")
        pytest.skip(f"{tool} not installed (Debian package nftables / util-linux)")
    return path


@pytest.mark.parametrize("backend", ["ufw", "firewalld", "nftables", "pf"])
def test_shell_scripts_parse(backend: str, tmp_path: Path) -> None:
    s = firewall.scripts(backend, PORTS, ALLOW)
    for name, text in (("apply", s.apply), ("rollback", s.rollback)):
        path = tmp_path / f"{backend}-{name}.sh"
        path.write_text(text)
        proc = subprocess.run(
            ["bash", "-n", str(path)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
    # both ports and both address families are covered
    for port in PORTS:
        assert str(port) in s.apply
    assert "192.168.10.0/24" in s.apply and "2001:db8:42::/48" in s.apply


def test_powershell_covers_ports_and_both_families() -> None:
    s = firewall.scripts("powershell", PORTS, ALLOW)
    assert "-LocalPort 8080,8081" in s.apply
    assert "'192.168.10.0/24','2001:db8:42::/48'" in s.apply
    assert "Remove-NetFirewallRule -Group 'FLM'" in s.rollback


def test_nftables_ruleset_checks(tmp_path: Path) -> None:
    nft = _need("nft")
    for allow in (ALLOW, []):
        s = firewall.scripts("nftables", PORTS, allow)
        assert s.ruleset is not None
        path = tmp_path / "rules.nft"
        path.write_text(s.ruleset)
        proc = subprocess.run(
            [nft, "-c", "-f", str(path)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr + s.ruleset


def test_bad_input_never_reaches_a_script() -> None:
    with pytest.raises(UsageError):
        firewall.scripts("ufw", PORTS, ["10.0.0.0/8; rm -rf /"])
    with pytest.raises(UsageError):
        firewall.scripts("ufw", ["8080 || true"], ALLOW)
    with pytest.raises(UsageError):
        firewall.scripts("iptables-legacy", PORTS, ALLOW)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root for unshare --net"
)
def test_nftables_apply_and_rollback_in_a_namespace(tmp_path: Path) -> None:
    _need("nft")
    _need("unshare")
    s = firewall.scripts("nftables", PORTS, ALLOW)
    (tmp_path / "apply.sh").write_text(s.apply)
    (tmp_path / "rollback.sh").write_text(s.rollback)
    driver = (
        f"set -e; cd {tmp_path}; nft list ruleset > before.txt; bash apply.sh; "
        "nft list ruleset > applied.txt; bash apply.sh; nft list ruleset > again.txt; "
        "bash rollback.sh; nft list ruleset > after.txt; bash rollback.sh"
    )
    proc = subprocess.run(
        ["unshare", "--net", "bash", "-c", driver],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    applied = (tmp_path / "applied.txt").read_text()
    assert "table inet flm" in applied and "8080" in applied and "2001:db8:42::/48" in applied
    assert (tmp_path / "again.txt").read_text() == applied  # applying twice is idempotent
    assert (tmp_path / "after.txt").read_text() == (tmp_path / "before.txt").read_text()


def test_apply_logs_to_the_security_log(tmp_path: Path, flm_home: Path) -> None:
    """The wizard's apply path, run for real inside a namespace (root only), writes its log."""
    paths = Paths.resolve()
    s = firewall.scripts("pf", PORTS, ALLOW)
    with pytest.raises(UsageError):  # other systems' rules are shown, never run here
        firewall.apply(paths, s)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        with pytest.raises(UsageError, match="root"):
            firewall.apply(paths, firewall.scripts("nftables", PORTS, ALLOW))
        return
    _need("nft")
    _need("unshare")
    # run the apply/rollback pair in a namespace through the same function, via a re-exec
    code = (
        "import sys; from flm.core.paths import Paths; from flm.ui import firewall; "
        "s = firewall.scripts('nftables', [8080, 8081], ['192.168.10.0/24']); "
        "r = firewall.apply(Paths.resolve(), s); "
        "b = firewall.apply(Paths.resolve(), s, rollback=True); "
        "print(r['exit_status'], b['exit_status'])"
    )
    import sys

    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0"]
    logs = sorted((flm_home / "logs" / "security").glob("firewall-*.log"))
    assert len(logs) == 2
    assert logs[0].stat().st_mode & 0o777 == 0o600
    assert "table inet flm" in logs[0].read_text()
