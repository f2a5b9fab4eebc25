"""An authenticated client's request rate is the rate limit's business (issue 17, finding 9):
the anomaly detector records it and never auto-blocks it; a client without a valid key still
is."""

from __future__ import annotations

from tests.security.conftest import OUTSIDE, Env


def test_a_client_with_a_valid_key_is_never_anomaly_blocked(env: Env) -> None:
    env.policy(
        {
            "ip_blocklist": OUTSIDE,
            "anomaly_detection": {"enabled": True, "request_rate_threshold": 5},
        }
    )
    codes = [env.request("GET", "/v1/models", source="127.0.0.21")[0] for _ in range(12)]
    assert codes == [200] * 12
    assert env.rt.guard.blocked("127.0.0.21") is None
    assert env.rt.audit is not None
    env.rt.audit.flush()
    kinds = {r["anomaly_type"] for r in env.cli("security", "anomaly").data}
    assert "request_rate" in kinds  # still recorded
    # without a key (or with a wrong one) the same rate is blocked
    codes = [env.request("GET", "/v1/models", source="127.0.0.22", key=None)[0] for _ in range(7)]
    assert codes[:5] == [401] * 5 and codes[5:] == [403, 403]
