"""Policy ``trusted_clients``: never auto-blocked or scored; everyone else still is."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import audit_rows
from tests.security.conftest import Env

TRUSTED = "127.0.0.5"
OTHER = "127.0.0.6"


def test_trusted_client_is_never_blocked(env: Env, flm_home: Path) -> None:
    # (127.0.0.x stand for outside clients here: loopback's own exemption is switched off)
    env.policy(
        {
            "ip_blocklist": {"enabled": True, "max_failures": 5, "exempt_loopback": False},
            "intrusion_detection": {"enabled": True},
            "trusted_clients": ["127.0.0.4/31"],
        }
    )  # 127.0.0.4 and 127.0.0.5
    for _ in range(50):
        status, _h, _b = env.chat(source=TRUSTED, key="flm_0000000000000000_wrong")
        assert status == 401
    for _ in range(3):  # honeypot hits are not scored either
        status, _h, _b = env.request("GET", "/wp-admin", source=TRUSTED)
        assert status == 404
    status, _h, body = env.chat(source=TRUSTED)
    assert status == 200, body

    statuses = [env.chat(source=OTHER, key="flm_0000000000000000_wrong")[0] for _ in range(6)]
    assert statuses[:5] == [401] * 5 and statuses[5] == 403
    assert env.chat(source=OTHER)[0] == 403  # blocked now, even with a good key

    flush = env.rt.audit.flush if env.rt.audit else None
    blocked = audit_rows(flm_home, "SELECT ip FROM ip_blocklist", flush=flush)
    assert blocked == [(OTHER,)]
    assert audit_rows(
        flm_home, f"SELECT COUNT(*) FROM intrusion_attempts WHERE ip = '{TRUSTED}'", flush=flush
    ) == [(0,)]
    # the failures are still audited, they just never count towards a block
    failures = audit_rows(
        flm_home,
        "SELECT COUNT(*) FROM audit_logs WHERE event_type = "
        f"'auth_failure' AND client_ip = '{TRUSTED}'",
        flush=flush,
    )
    assert failures == [(50,)]
    assert env.rt.guard.blocked(TRUSTED) is None


def test_without_the_list_the_same_client_is_blocked(env: Env) -> None:
    env.policy({"ip_blocklist": {"enabled": True, "max_failures": 5, "exempt_loopback": False}})
    statuses = [env.chat(source=TRUSTED, key="flm_0000000000000000_wrong")[0] for _ in range(6)]
    assert statuses[5] == 403


def test_log_level_applies_on_reload(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flm config set log.level` and a reload's FLM_LOG_LEVEL change a running process's
    level (the daemon and foreground proxies run reload_proxies on every reload)."""
    from flm.core import jsonlog
    from flm.core.paths import Paths
    from flm.proxy import instance
    from flm.services.context import Context

    root = logging.getLogger("flm")
    saved = root.level
    monkeypatch.setattr(instance, "_log_override", None)
    ctx = Context(Paths.resolve())
    try:
        assert asyncio.run(instance.reload_proxies(ctx, [])) == []
        assert root.level == logging.getLevelName(jsonlog.start_level())
        assert cli("config", "set", "log.level", "debug").code == 0
        asyncio.run(instance.reload_proxies(ctx, []))
        assert root.level == logging.DEBUG
        asyncio.run(instance.reload_proxies(ctx, [], log_level="error"))
        assert root.level == logging.ERROR
        asyncio.run(instance.reload_proxies(ctx, []))  # the reload's level is remembered
        assert root.level == logging.ERROR
        bad = cli("config", "set", "log.level", "loud")
        assert bad.code == 1
    finally:
        ctx.close()
        root.setLevel(saved)
