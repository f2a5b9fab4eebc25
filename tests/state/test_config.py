"""``--state-backend`` options: what is accepted, what is refused, and what is shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flm.core.errors import ProxyError
from flm.services.proxy_config import StartConfig
from flm.state.config import StateBackendConfig


def test_urls_and_what_is_shown() -> None:
    plain = StateBackendConfig.from_options("redis://10.0.0.5:6380/2", None, False)
    assert plain is not None
    assert (plain.db, plain.tls, plain.display) == (2, False, "redis://10.0.0.5:6380/2")
    tls = StateBackendConfig.from_options("rediss://flm@cache.example:6379", None, True)
    assert tls is not None and tls.tls and tls.fail_open
    assert tls.display == "rediss://cache.example:6379/0"  # (no user name either)
    v6 = StateBackendConfig.from_options("redis://[::1]/0", None, False)
    assert v6 is not None and v6.display == "redis://[::1]:6379/0"
    assert StateBackendConfig.from_options(None, None, False) is None


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://h:6379/0", "redis:// or rediss://"),
        ("redis://:secret@h:6379/0", "--state-password-file"),
        ("redis://user:secret@h:6379/0", "--state-password-file"),
        ("redis://h:6379/x", "database must be a number"),
        ("redis:///0", "needs a host"),
        ("redis://h:6379/0?password=x", "no query string"),
    ],
)
def test_bad_urls_are_refused_without_echoing_a_password(url: str, said: str) -> None:
    with pytest.raises(ProxyError) as info:
        StateBackendConfig.from_options(url, None, False)
    assert said in info.value.message
    assert "secret" not in info.value.message


def test_options_need_the_backend() -> None:
    with pytest.raises(ProxyError, match="need --state-backend"):
        StateBackendConfig.from_options(None, None, True)


def test_password_file_must_be_private_and_not_empty(tmp_path: Path) -> None:
    good = tmp_path / "pw"
    good.write_text("  s3cret  \nignored\n")
    os.chmod(good, 0o600)
    config = StateBackendConfig.from_options("redis://h/0", str(good), False)
    assert config is not None and config.password() == "s3cret"
    assert "s3cret" not in repr(config.to_dict())
    os.chmod(good, 0o640)
    with pytest.raises(ProxyError, match="chmod 600"):
        StateBackendConfig.from_options("redis://h/0", str(good), False)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    with pytest.raises(ProxyError, match="is empty"):
        StateBackendConfig.from_options("redis://h/0", str(empty), False)
    with pytest.raises(ProxyError, match="cannot read"):
        StateBackendConfig.from_options("redis://h/0", str(tmp_path / "missing"), False)


def test_start_config_carries_the_backend() -> None:
    config = StartConfig.from_dict(
        {"port": 8080, "state_backend": "redis://127.0.0.1:6379/1", "state_fail_open": True}
    )
    assert config.state is not None and config.state.fail_open and config.state.db == 1
    assert StartConfig.from_dict({"port": 8080}).state is None
