"""dev-selfsigned and packaged-ca issuance: files, modes, names, reuse and re-issue."""

from __future__ import annotations

import ipaddress
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

import flm
from flm.core.errors import ProxyCertError
from flm.tls.certs import CertBundle, load_cert_file, needs_renewal
from flm.tls.issue import (
    LOCAL_CA_MODE,
    ensure_dev_selfsigned,
    ensure_local_ca,
    ensure_server_cert,
    local_ca_paths,
)
from flm.tls.lan import lan_addresses

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify(bundle: CertBundle, name: x509.GeneralName) -> None:
    assert bundle.ca_path is not None
    root = load_cert_file(bundle.ca_path)[0]
    chain = load_cert_file(bundle.cert_path)
    moment = bundle.not_before + timedelta(hours=2)
    verifier = PolicyBuilder().store(Store([root])).time(moment).build_server_verifier(name)
    verifier.verify(chain[0], chain[1:])


# --- dev-selfsigned ------------------------------------------------------------------------


def test_dev_selfsigned_files_names_and_modes(flm_home: Path) -> None:
    certs = flm_home / "certs"
    bundle = ensure_dev_selfsigned(certs, lan_addresses=["192.168.1.20", "fd00::5"], now=T0)

    directory = certs / "dev-selfsigned"
    assert bundle.cert_path == directory / "server.pem"
    assert bundle.key_path == directory / "server-key.pem"
    assert bundle.ca_path == directory / "ca.pem"
    assert _mode(directory) == 0o700
    assert _mode(bundle.key_path) == 0o600
    assert _mode(directory / "ca-key.pem") == 0o600
    assert bundle.issued and bundle.mode == "dev-selfsigned"
    assert bundle.hosts == ("localhost", "127.0.0.1", "192.168.1.20", "::1", "fd00::5")

    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("192.168.1.20")),
    ):
        _verify(bundle, name)


def test_dev_selfsigned_is_reused_while_valid(flm_home: Path) -> None:
    certs = flm_home / "certs"
    first = ensure_dev_selfsigned(certs, lan_addresses=["10.0.0.2"], now=T0)
    again = ensure_dev_selfsigned(certs, lan_addresses=["10.0.0.2"], now=T0 + timedelta(days=100))
    assert not again.issued
    assert again.fingerprint_sha256 == first.fingerprint_sha256


def test_dev_selfsigned_reissued_when_lan_addresses_change(flm_home: Path) -> None:
    certs = flm_home / "certs"
    first = ensure_dev_selfsigned(certs, lan_addresses=["10.0.0.2"], now=T0)
    root_pem = (certs / "dev-selfsigned" / "ca.pem").read_bytes()
    moved = ensure_dev_selfsigned(certs, lan_addresses=["10.0.0.3"], now=T0)
    assert moved.issued and moved.fingerprint_sha256 != first.fingerprint_sha256
    assert "10.0.0.3" in moved.hosts and "10.0.0.2" not in moved.hosts
    assert (certs / "dev-selfsigned" / "ca.pem").read_bytes() == root_pem  # the root stays


def test_dev_selfsigned_reissued_near_expiry(flm_home: Path) -> None:
    certs = flm_home / "certs"
    first = ensure_dev_selfsigned(certs, lan_addresses=[], now=T0)
    late = first.not_after - timedelta(days=10)
    renewed = ensure_dev_selfsigned(certs, lan_addresses=[], now=late)
    assert renewed.issued and renewed.not_after > first.not_after


def test_dev_root_replaced_when_it_nears_its_end(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ensure_dev_selfsigned(certs, lan_addresses=[], now=T0)
    root = load_cert_file(certs / "dev-selfsigned" / "ca.pem")[0]
    late = root.not_valid_after_utc - timedelta(days=5)
    bundle = ensure_dev_selfsigned(certs, lan_addresses=[], now=late)
    new_root = load_cert_file(certs / "dev-selfsigned" / "ca.pem")[0]
    assert new_root.serial_number != root.serial_number
    assert bundle.issued
    _verify(bundle, x509.DNSName("localhost"))


def test_dev_selfsigned_repairs_a_damaged_key(flm_home: Path) -> None:
    certs = flm_home / "certs"
    first = ensure_dev_selfsigned(certs, lan_addresses=[], now=T0)
    first.key_path.write_bytes(b"garbage")
    repaired = ensure_dev_selfsigned(certs, lan_addresses=[], now=T0)
    assert repaired.issued and repaired.fingerprint_sha256 != first.fingerprint_sha256


def test_dev_selfsigned_uses_detected_lan_addresses(flm_home: Path) -> None:
    bundle = ensure_dev_selfsigned(flm_home / "certs")
    for address in lan_addresses():
        assert str(ipaddress.ip_address(address)) in bundle.hosts


def test_lan_addresses_are_not_loopback_or_link_local() -> None:
    for text in lan_addresses():
        ip = ipaddress.ip_address(text)
        assert not (ip.is_loopback or ip.is_link_local or ip.is_multicast)


# --- packaged-ca ---------------------------------------------------------------------------


def test_local_ca_created_once_for_ten_years(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0)
    assert ca.created
    assert (ca.cert_path, ca.key_path) == local_ca_paths(certs)
    assert _mode(ca.key_path) == 0o600 and _mode(certs / LOCAL_CA_MODE) == 0o700
    assert ca.not_after - T0 >= timedelta(days=3650)
    again = ensure_local_ca(certs, now=T0 + timedelta(days=3000))
    assert not again.created and again.fingerprint_sha256 == ca.fingerprint_sha256
    root = load_cert_file(ca.cert_path)[0]
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0


def test_server_cert_reused_then_reissued_with_short_validity(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0)
    hosts = ["localhost", "127.0.0.1"]
    first = ensure_server_cert(ca, certs, hosts, validity_days=2, now=T0)
    assert first.issued and first.not_after == T0 + timedelta(days=2)

    reused = ensure_server_cert(ca, certs, hosts, validity_days=2, now=T0 + timedelta(hours=12))
    assert not reused.issued and reused.fingerprint_sha256 == first.fingerprint_sha256

    # Two thirds through its life it is renewed (default margin: a third of the validity) …
    renewed = ensure_server_cert(ca, certs, hosts, validity_days=2, now=T0 + timedelta(hours=34))
    assert renewed.issued and renewed.fingerprint_sha256 != first.fingerprint_sha256
    # … and once expired, too.
    expired_at = renewed.not_after + timedelta(minutes=1)
    assert needs_renewal(load_cert_file(renewed.cert_path)[0], expired_at, days=0)
    after = ensure_server_cert(ca, certs, hosts, validity_days=2, now=expired_at)
    assert after.issued and after.not_after > expired_at
    _verify(after, x509.DNSName("localhost"))


def test_server_cert_reissued_for_new_hosts(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0)
    first = ensure_server_cert(ca, certs, ["localhost"], now=T0)
    same = ensure_server_cert(ca, certs, ["LOCALHOST."], now=T0)
    assert not same.issued
    other = ensure_server_cert(ca, certs, ["localhost", "flm.lan"], now=T0)
    assert other.issued and other.fingerprint_sha256 != first.fingerprint_sha256
    assert other.hosts == ("flm.lan", "localhost")


def test_server_cert_never_outlives_its_root(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0, validity_days=30)
    bundle = ensure_server_cert(ca, certs, ["localhost"], validity_days=397, now=T0)
    assert bundle.not_after == ca.not_after


def test_expired_local_ca_is_an_error_with_recovery_steps(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0)
    with pytest.raises(ProxyCertError, match="uninstall-ca"):
        ensure_local_ca(certs, now=ca.not_after + timedelta(days=1))


def test_missing_local_ca_key_is_not_silently_replaced(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0)
    ca.key_path.unlink()
    with pytest.raises(ProxyCertError) as caught:
        ensure_local_ca(certs, now=T0)
    assert caught.value.code == "PROXY_CERT_FAILED"
    assert ca.cert_path.exists()


def test_wildcards_and_junk_hosts_are_refused(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs, now=T0)
    for hosts in (["*.example.com"], ["bad host"], []):
        with pytest.raises(ProxyCertError):
            ensure_server_cert(ca, certs, hosts, now=T0)


def test_record_matches_the_certificates_table(flm_home: Path) -> None:
    migration = Path(flm.__file__).parent / "storage/migrations/security/0001_initial.sql"
    sql = migration.read_text()
    table = re.search(r"CREATE TABLE certificates \((.*?)\);", sql, re.S)
    assert table is not None
    columns = [line.split()[0] for line in table.group(1).strip().splitlines()]
    bundle = ensure_dev_selfsigned(flm_home / "certs", lan_addresses=[], now=T0)
    record = bundle.to_record(created_at=T0)
    assert sorted(record) == sorted(columns)
    assert record["id"] == "dev-selfsigned"
    assert record["fingerprint_sha256"] == bundle.fingerprint_sha256
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", bundle.fingerprint_sha256)
