"""Installing the root into the OS trust store: plans, checks, and a real Linux round trip."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from flm.core.errors import ProxyCertError
from flm.tls import truststore
from flm.tls.certs import fingerprint_sha1, load_cert_file
from flm.tls.context import server_ssl_context
from flm.tls.issue import ensure_dev_selfsigned, ensure_local_ca, ensure_server_cert
from flm.tls.truststore import (
    DEFAULT_STORE_NAME,
    DEV_STORE_NAME,
    install_ca,
    plan_install,
    uninstall_ca,
)
from tests.support import curl_with_system_trust, require_real_trust_store


@pytest.fixture
def root(flm_home: Path) -> Path:
    return ensure_local_ca(flm_home / "certs").cert_path


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))


# --- plans ------------------------------------------------------------------------------


def test_debian_plan_lists_file_and_command(root: Path) -> None:
    plan, checked = plan_install(root, platform="debian")
    assert plan.files_to_write == (Path("/usr/local/share/ca-certificates/flm-local-ca.crt"),)
    assert plan.commands == (("update-ca-certificates",),)
    assert plan.needs_privileges
    assert plan.fingerprint_sha256 == checked.fingerprint_sha256
    assert "FLM Local Root CA" in (plan.subject or "")
    body = plan.to_dict()
    assert body["commands"] == [["update-ca-certificates"]]
    assert body["dry_run"] is True and body["executed"] is False


def test_macos_and_windows_plans(root: Path) -> None:
    mac = install_ca(root, dry_run=True, platform="macos")
    assert mac.commands == (
        (
            "security",
            "add-trusted-cert",
            "-d",
            "-r",
            "trustRoot",
            "-k",
            "/Library/Keychains/System.keychain",
            str(root),
        ),
    )
    assert mac.files_to_write == ()
    win = install_ca(root, dry_run=True, platform="windows")
    assert win.commands == (("certutil", "-addstore", "-f", "ROOT", str(root)),)

    sha1 = fingerprint_sha1(load_cert_file(root)[0])
    assert uninstall_ca(root, dry_run=True, platform="windows").commands == (
        ("certutil", "-delstore", "ROOT", sha1),
    )
    mac_off = uninstall_ca(root, dry_run=True, platform="macos")
    assert mac_off.commands[-1] == (
        "security",
        "delete-certificate",
        "-Z",
        sha1,
        "/Library/Keychains/System.keychain",
    )


def test_macos_install_runs_exactly_the_planned_commands(root: Path) -> None:
    runner = Recorder()
    plan = install_ca(root, platform="macos", runner=runner)
    assert plan.executed and not plan.dry_run
    assert runner.calls == [list(c) for c in plan.commands]


def test_uninstall_elsewhere_needs_the_certificate() -> None:
    with pytest.raises(ProxyCertError, match="--cert-path"):
        uninstall_ca(None, dry_run=True, platform="windows")


def test_unprivileged_install_is_refused_before_touching_anything(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(truststore, "is_privileged", lambda: False)
    runner = Recorder()
    with pytest.raises(ProxyCertError, match="administrator rights") as caught:
        install_ca(root, platform="macos", runner=runner)
    assert runner.calls == []
    assert caught.value.details["commands"][0][0] == "security"


# --- checks on the certificate --------------------------------------------------------------


def test_expected_fingerprint_must_match(root: Path) -> None:
    _, checked = plan_install(root, platform="debian")
    lower = checked.fingerprint_sha256.replace(":", "").lower()
    assert install_ca(root, dry_run=True, platform="debian", expected_fingerprint=lower)
    with pytest.raises(ProxyCertError, match="SHA-256 fingerprint"):
        install_ca(root, dry_run=True, platform="debian", expected_fingerprint="00" * 32)


def test_only_a_self_signed_unexpired_root_is_accepted(flm_home: Path, tmp_path: Path) -> None:
    certs = flm_home / "certs"
    leaf = ensure_dev_selfsigned(certs, lan_addresses=[])
    with pytest.raises(ProxyCertError, match="not a CA"):
        install_ca(leaf.cert_path, dry_run=True, platform="debian")

    intermediate = trustme.CA().create_child_ca()
    child = tmp_path / "child.pem"
    intermediate.cert_pem.write_to_path(str(child))
    with pytest.raises(ProxyCertError, match="self-signed"):
        install_ca(child, dry_run=True, platform="debian")

    old = ensure_local_ca(tmp_path / "old", now=datetime(2001, 1, 1, tzinfo=UTC), validity_days=1)
    with pytest.raises(ProxyCertError, match="expired"):
        install_ca(old.cert_path, dry_run=True, platform="debian")

    two = tmp_path / "two.pem"
    root = ensure_local_ca(certs).cert_path
    two.write_bytes(root.read_bytes() * 2)
    with pytest.raises(ProxyCertError, match="exactly one"):
        install_ca(two, dry_run=True, platform="debian")

    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(ProxyCertError, match="not a readable certificate"):
        install_ca(junk, dry_run=True, platform="debian")

    with pytest.raises(ProxyCertError, match="cannot read"):
        install_ca(tmp_path / "absent.pem", dry_run=True, platform="debian")


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("flm-test-ca", True),
        ("flm.ca_2", True),
        ("../etc/passwd", False),
        ("", False),
        (".hidden", False),
        ("a/b", False),
    ],
)
def test_store_name_cannot_escape_the_directory(root: Path, name: str, valid: bool) -> None:
    if valid:
        plan = install_ca(root, dry_run=True, platform="debian", store_name=name)
        assert plan.files_to_write == (Path(f"/usr/local/share/ca-certificates/{name}.crt"),)
    else:
        with pytest.raises(ProxyCertError, match="invalid trust store name"):
            install_ca(root, dry_run=True, platform="debian", store_name=name)


def test_store_names_are_clear(flm_home: Path) -> None:
    assert DEFAULT_STORE_NAME == "flm-local-ca"
    dev_root = ensure_dev_selfsigned(flm_home / "certs", lan_addresses=[]).ca_path
    assert dev_root is not None
    plan = install_ca(dev_root, dry_run=True, platform="debian", store_name=DEV_STORE_NAME)
    assert plan.files_to_write == (Path("/usr/local/share/ca-certificates/flm-dev-ca.crt"),)


# --- the real thing (Linux, root) -----------------------------------------------------------


async def _curl(url: str) -> tuple[int, str]:
    argv, env = curl_with_system_trust(url)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(errors="replace")


def test_install_then_uninstall_for_real(flm_home: Path) -> None:
    require_real_trust_store("the real trust-store test")
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs)
    bundle = ensure_server_cert(ca, certs, ["localhost", "127.0.0.1"])
    name = f"flm-test-{uuid.uuid4().hex[:12]}"
    installed_file = Path("/usr/local/share/ca-certificates") / f"{name}.crt"
    assert not installed_file.exists()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntrusted!\n")
        await writer.drain()
        writer.close()

    async def run() -> None:
        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=server_ssl_context(bundle), ssl_handshake_timeout=10
        )
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/"
        try:
            code, text = await _curl(url)
            assert code == 60, (
                text
            )  # not trusted yet (curl: peer certificate cannot be authenticated)

            plan = await asyncio.to_thread(install_ca, ca.cert_path, store_name=name)
            assert plan.executed and plan.files_to_write == (installed_file,)
            assert installed_file.read_bytes() == ca.cert_path.read_bytes()
            code, text = await _curl(url)
            assert code == 0, text
            assert text == "trusted!\n"

            removed = await asyncio.to_thread(uninstall_ca, store_name=name)
            assert removed.executed and removed.files_to_remove == (installed_file,)
            assert removed.fingerprint_sha256 == ca.fingerprint_sha256
            code, text = await _curl(url)
            assert code == 60, text
        finally:
            server.close()
            await server.wait_closed()

    try:
        asyncio.run(run())
    finally:
        leftover = uninstall_ca(store_name=name)  # idempotent: a no-op when already removed
        assert not installed_file.exists()
        assert not leftover.installed or leftover.executed
    assert not (Path("/etc/ssl/certs") / f"{name}.pem").exists()
    # Nothing is left in the bundle OpenSSL uses by default.
    bundle_file = Path(
        ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    )
    assert ca.cert_path.read_bytes().strip() not in bundle_file.read_bytes()
