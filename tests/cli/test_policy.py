"""`flm security policy`: validated against the shipped schema; refusals keep the old policy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

VALID = {
    "ip_whitelist": ["127.0.0.1", "192.168.0.0/16", "::1", "fd00::/8"],
    "trusted_proxies": ["10.0.0.1"],
    "cors": {"allowed_origins": ["https://example.com"]},
    "rate_limit": {"rpm": 60, "burst": 10},
    "ip_rate_limit": {"enabled": True, "rpm": 1000, "burst": 100},
    "ip_blocklist": {
        "enabled": True,
        "max_failures": 5,
        "block_duration_minutes": 30,
        "permanent_block_threshold": 20,
    },
    "intrusion_detection": {"enabled": True, "warning_threshold": 50, "score_threshold": 100},
    "anomaly_detection": {"enabled": True, "request_rate_threshold": 100, "auto_block": True},
    "resource_protection": {
        "enabled": True,
        "cpu_threshold": 90,
        "memory_threshold": 90,
        "max_connections": 100,
    },
}


def test_default_policy_is_empty(cli: Any) -> None:
    data = cli("security", "policy", "show").data
    assert data["policy"] == {} and data["source"] == "default"


def test_valid_policy_round_trips_from_file_and_stdin(cli: Any, tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text(json.dumps(VALID))
    assert cli("security", "policy", "set", "--file", str(f)).code == 0
    assert cli("security", "policy", "show").data["policy"] == VALID
    smaller = {"rate_limit": {"rpm": 5}}
    assert cli("security", "policy", "set", stdin=json.dumps(smaller)).code == 0
    assert cli("security", "policy", "show").data["policy"] == smaller


@pytest.mark.parametrize(
    ("document", "path_fragment"),
    [
        ({"ip_whitelist": ["300.1.1.1/8"]}, "$.ip_whitelist[0]"),
        ([1, 2, 3], "$"),
        ("just a string", "$"),
        ({"rate_limit": {"rpm": "sixty"}}, "$.rate_limit.rpm"),
        ({"rate_limit": {"rpm": -1}}, "$.rate_limit.rpm"),
        ({"cors": {"allowed_origins": ["not a url"]}}, "$.cors.allowed_origins[0]"),
        ({"ip_whitlist": []}, "ip_whitlist"),
        ({"trusted_proxies": ["::zz"]}, "$.trusted_proxies[0]"),
    ],
)
def test_invalid_policies_refused_and_old_kept(
    cli: Any, document: object, path_fragment: str
) -> None:
    cli("security", "policy", "set", stdin=json.dumps(VALID))
    result = cli("security", "policy", "set", stdin=json.dumps(document))
    assert result.code == 1
    assert result.error["code"] == "POLICY_INVALID"
    assert path_fragment in result.error["message"]
    assert cli("security", "policy", "show").data["policy"] == VALID


def test_not_json_is_refused(cli: Any) -> None:
    result = cli("security", "policy", "set", stdin="{not json")
    assert result.code == 1 and result.error["code"] == "POLICY_INVALID"


def test_missing_file_is_a_user_error(cli: Any, tmp_path: Path) -> None:
    result = cli("security", "policy", "set", "--file", str(tmp_path / "nope.json"))
    assert result.code == 1 and "not found" in result.error["message"]


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        '{"rate_limit": {"rpm": Infinity}}',
        '{"rate_limit": {"rpm": 1e400}}',
        '{"rate_limit": {"rpm": ' + "9" * 5000 + "}}",
        "[" * 100_000,
    ],
)
def test_documents_python_would_mishandle_are_refused_cleanly(
    cli: Any, tmp_path: Path, text: str
) -> None:
    assert cli("security", "policy", "set", stdin=json.dumps({"rate_limit": {"rpm": 7}})).code == 0
    f = tmp_path / "bad.json"
    f.write_text(text)
    refused = cli("security", "policy", "set", "--file", str(f))
    assert refused.code == 1 and refused.error["code"] == "POLICY_INVALID", refused.out[:300]
    assert cli("security", "policy", "show").data["policy"] == {"rate_limit": {"rpm": 7}}
    params = cli(
        "model-profiles",
        "save",
        "--engine",
        "e",
        "--model",
        "m",
        "--label",
        "l",
        "--params",
        str(f),
    )
    assert params.code == 1 and params.error["code"] == "INVALID_ARGUMENT"


def test_a_byte_order_mark_and_binary_stdin(cli: Any, tmp_path: Path) -> None:
    f = tmp_path / "bom.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"rate_limit": {"rpm": 9}}).encode())
    assert cli("security", "policy", "set", "--file", str(f)).code == 0
    assert cli("security", "policy", "show").data["policy"] == {"rate_limit": {"rpm": 9}}
    result = subprocess.run(
        [sys.executable, "-m", "flm", "api", "prompts", "set", "--api-id", "chat_completions"],
        input=b"\xff\xfe\x00binary",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(result.stdout)["error"]["code"] == "INVALID_ARGUMENT"
    assert b"Traceback" not in result.stderr


def test_an_oversized_policy_is_refused_before_it_is_read_whole(cli: Any, tmp_path: Path) -> None:
    f = tmp_path / "huge.json"
    f.write_text(json.dumps({"ip_whitelist": ["203.0.113.0/24"] * 400_000}))  # ~7 MB
    started = time.monotonic()
    refused = cli("security", "policy", "set", "--file", str(f))
    assert time.monotonic() - started < 5
    assert refused.code == 1 and refused.error["code"] == "INVALID_ARGUMENT"
    assert "MiB" in refused.error["message"] and len(refused.out) < 1000
    piped = cli("security", "policy", "set", stdin=f.read_text())
    assert piped.code == 1 and "standard input is larger" in piped.error["message"]


@pytest.mark.parametrize(
    "document",
    [
        {"rate_limit": {"rpm": "9" * 2_000_000}},  # one problem quoting 2 MB
        {"ip_whitelist": [1] * 300_000},  # 300,000 problems
    ],
)
def test_what_an_invalid_policy_error_quotes_is_bounded(
    cli: Any, tmp_path: Path, document: Any
) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(document))
    refused = cli("security", "policy", "set", "--file", str(f))
    assert refused.code == 1 and refused.error["code"] == "POLICY_INVALID"
    assert len(refused.out) < 64_000
