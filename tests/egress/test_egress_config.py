"""Egress settings and the loopback rule (no network)."""

from __future__ import annotations

import pytest

from flm.core.errors import ProxyError
from flm.egress.config import (
    TOR_DEFAULT_ENDPOINT,
    EgressConfig,
    SocksEndpoint,
    is_loopback_target,
    parse_socks_endpoint,
)
from flm.egress.connector import connector_for


def test_defaults() -> None:
    config = EgressConfig()
    assert config.mode == "direct" and not config.uses_proxy and config.endpoint is None
    assert not config.fail_open


def test_tor_defaults_to_the_local_tor_port() -> None:
    config = EgressConfig("tor")
    assert config.socks5_endpoint == TOR_DEFAULT_ENDPOINT == "127.0.0.1:9050"
    assert config.endpoint == SocksEndpoint("127.0.0.1", 9050)
    assert EgressConfig("tor", "127.0.0.1:9150").endpoint == SocksEndpoint("127.0.0.1", 9150)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1080", SocksEndpoint("127.0.0.1", 1080)),
        ("socks5h://127.0.0.1:1080", SocksEndpoint("127.0.0.1", 1080)),
        ("SOCKS5://proxy.lan:1080/", SocksEndpoint("proxy.lan", 1080)),
        ("[::1]:9050", SocksEndpoint("::1", 9050)),
    ],
)
def test_endpoint_forms(text: str, expected: SocksEndpoint) -> None:
    assert parse_socks_endpoint(text) == expected


def test_endpoint_is_stored_canonically() -> None:
    assert EgressConfig("socks5", " socks5h://[::1]:1080 ").socks5_endpoint == "[::1]:1080"


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "http://127.0.0.1:8080", ":1080", "u:p@h:1"],
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ProxyError):
        EgressConfig("socks5", text)


def test_bad_combinations() -> None:
    with pytest.raises(ProxyError, match="needs --socks5-endpoint"):
        EgressConfig("socks5")
    with pytest.raises(ProxyError, match="needs --egress-mode"):
        EgressConfig("direct", "127.0.0.1:1080")
    with pytest.raises(ProxyError, match="unknown egress mode"):
        EgressConfig.from_options("vpn")
    assert EgressConfig.from_options(None).mode == "direct"
    assert EgressConfig.from_options(" TOR ", None, True).fail_open


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("http://localhost:11434/v1/models", True),
        ("http://LOCALHOST.:11434", True),
        ("http://engine.localhost:8000", True),
        ("http://127.0.0.1:8000", True),
        ("http://127.8.9.10:8000", True),
        ("http://127.1:8000", True),
        ("http://2130706433:8000", True),
        ("http://0x7f.0.0.1:8000", True),
        ("http://[::1]:8000/", True),
        ("http://[::ffff:127.0.0.1]:8000/", True),
        ("http://0.0.0.0:8000", True),
        ("localhost", True),
        ("[::1]", True),
        ("http://10.0.0.5:8000", False),
        ("https://api.example.com/v1", False),
        ("http://localhost.example.com", False),
        ("http://mylocalhost:80", False),
        ("http://[2001:db8::1]:80", False),
        ("http://engine.flm-test.invalid", False),
        ("http://cafe:80", False),
    ],
)
def test_loopback_rule(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback


def test_bad_urls_are_refused() -> None:
    for bad in ("http://", "http://[::1"):
        with pytest.raises(ProxyError):
            is_loopback_target(bad)


def test_direct_mode_never_builds_a_connector() -> None:
    assert connector_for(EgressConfig(), "https://api.example.com") is None


def test_to_dict() -> None:
    assert EgressConfig("tor", fail_open=True).to_dict() == {
        "mode": "tor",
        "socks5_endpoint": "127.0.0.1:9050",
        "fail_open": True,
    }
