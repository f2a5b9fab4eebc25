"""``flm secrets dns add/list/remove``: profiles in security.db, secrets only in the store."""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from jaraco.classes import properties
from keyring.backend import KeyringBackend

from flm.services.dns_secrets import SecretStore, usable_keyring

SECRET = base64.b64encode(b"canary-" + os.urandom(25)).decode()


def _add(cli: Any, *extra: str, name: str = "home", stdin: str | None = SECRET) -> Any:
    return cli(
        "secrets",
        "dns",
        "add",
        name,
        "--provider",
        "rfc2136",
        "--server",
        "ns1.example.org:5353",
        "--zone",
        "example.org",
        "--tsig-name",
        "acme-key",
        *extra,
        stdin=stdin,
    )


def test_add_list_remove_with_the_file_store(
    cli: Any, flm_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLM_SECRETS_BACKEND", "file")  # whatever keyring this machine has
    secret_file = tmp_path / "tsig.secret"
    secret_file.write_text(SECRET + "\n")
    added = _add(cli, "--tsig-secret-file", str(secret_file), stdin=None)
    assert added.code == 0, added.out
    data = added.data
    assert data["server"] == "ns1.example.org:5353" and data["tsig_algorithm"] == "hmac-sha256"
    assert data["secret_store"] == "file"
    assert str(flm_home / "secrets" / "dns") in data["secrets_location"]

    store = flm_home / "secrets" / "dns" / "home.secret"
    assert store.read_text() == SECRET
    assert store.stat().st_mode & 0o777 == 0o600
    assert (flm_home / "secrets").stat().st_mode & 0o777 == 0o700

    listed = cli("secrets", "dns", "list")
    assert SECRET not in listed.out
    assert [p["name"] for p in listed.data["profiles"]] == ["home"]
    assert listed.data["profiles"][0]["secret_store"] == "file"
    text = cli("secrets", "dns", "list", "--format", "text")
    assert "secrets are kept in: files (mode 0600)" in text.out and SECRET not in text.out

    # The database holds the settings and a reference, never the secret.
    with sqlite3.connect(flm_home / "security.db") as db:
        rows = db.execute("SELECT * FROM dns_credentials").fetchall()
    assert len(rows) == 1 and SECRET not in repr(rows)
    assert all(SECRET.encode() not in p.read_bytes() for p in flm_home.glob("security.db*"))

    check = cli("check")
    assert check.data["dns_secrets"] == {"location": data["secrets_location"], "profiles": 1}
    store.unlink()
    assert any("dns profile home" in w for w in cli("check").data["warnings"])
    assert _add(cli).error["code"] == "INVALID_ARGUMENT"  # exists: needs --replace
    assert _add(cli, "--replace").code == 0
    removed = cli("secrets", "dns", "remove", "home")
    assert removed.code == 0 and not store.exists()
    assert cli("secrets", "dns", "list").data["profiles"] == []
    assert cli("secrets", "dns", "remove", "home").error["code"] == "DNS_PROFILE_NOT_FOUND"


def test_the_secret_is_never_taken_from_the_command_line(cli: Any) -> None:
    # No option takes the secret itself, and no abbreviation turns one into the file option.
    for flag in ("--tsig-secret", "--secret", "--tsig-secret-fil"):
        result = _add(cli, flag, SECRET)
        assert result.code == 1 and SECRET not in result.out + result.err
    # A secret passed where the file path goes is not echoed back either.
    wrong = _add(cli, "--tsig-secret-file", SECRET, stdin=None)
    assert wrong.code == 1 and SECRET not in wrong.out + wrong.err
    assert cli("secrets", "dns", "list").data["profiles"] == []


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        ((), "not-base64!", "base64"),
        ((), "two words", "one line"),
        ((), base64.b64encode(b"short").decode(), "128 bits"),
        ((), "", "empty"),
        (("--tsig-algorithm", "hmac-md5"), SECRET, "--tsig-algorithm"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(
    cli: Any, flm_home: Path, args: tuple[str, ...], stdin: str, needle: str
) -> None:
    result = _add(cli, *args, stdin=stdin)
    assert result.code == 1 and needle in result.error["message"]
    assert cli("secrets", "dns", "list").data["profiles"] == []
    assert not list(flm_home.glob("secrets/**/*.secret"))


def test_cloudflare_profile_needs_https_off_loopback(cli: Any) -> None:
    base = ("secrets", "dns", "add", "cf", "--provider", "cloudflare", "--zone", "example.org")
    plain = cli(*base, "--api-base", "http://api.example.org/client/v4", stdin="tok\n")
    assert plain.code == 1 and "plain http only on loopback" in plain.error["message"]
    ok = cli(*base, stdin="tok\n")
    assert ok.code == 0 and ok.data["api_base"] == "https://api.cloudflare.com/client/v4"
    mixed = cli(*base, "--server", "ns1:53", stdin="tok\n")
    assert mixed.code == 1


# --- the OS keyring ----------------------------------------------------------------------


class _MemoryKeyring(KeyringBackend):
    """A real ``keyring`` backend holding passwords in memory (stands in for the desktop's).

    keyring discovers every backend class; this one says it is not viable (its priority
    raises) except while the keyring test runs, so no other test picks it up."""

    enabled = False

    @properties.classproperty
    def priority(cls) -> float:
        if not cls.enabled:
            raise RuntimeError("only for the keyring test")
        return 5.0

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.items.pop((service, username), None)


def test_keyring_is_used_when_a_real_backend_is_there(
    cli: Any, flm_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyring
    from keyring.backends import fail

    previous = keyring.get_keyring()
    try:
        keyring.set_keyring(fail.Keyring())
        assert usable_keyring() is None  # the fail backend means "no keyring"
        assert SecretStore(flm_home).backend == "file"

        _MemoryKeyring.enabled = True
        memory = _MemoryKeyring()
        keyring.set_keyring(memory)
        assert usable_keyring() is memory
        added = _add(cli)
        assert added.code == 0 and added.data["secret_store"] == "keyring"
        assert "OS keyring" in added.data["secrets_location"]
        assert memory.items == {("flm-dns", "home"): SECRET}
        assert not (flm_home / "secrets" / "dns" / "home.secret").exists()
        monkeypatch.setenv("FLM_SECRETS_BACKEND", "file")
        assert SecretStore(flm_home).backend == "file"
        monkeypatch.delenv("FLM_SECRETS_BACKEND")
        assert cli("secrets", "dns", "remove", "home").code == 0
        assert memory.items == {}
    finally:
        _MemoryKeyring.enabled = False
        keyring.set_keyring(previous)
