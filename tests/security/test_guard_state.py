"""The in-memory guard state on a moved clock: token buckets, rate windows, remembered scores."""

from __future__ import annotations

from flm.proxy.guard import GuardState, score_request
from tests.support import FakeClock


def test_bucket_refills_and_follows_a_policy_change() -> None:
    clock = FakeClock(1000.0)
    guard = GuardState(clock)
    assert [guard.take("k", 60, 2) for _ in range(2)] == [0.0, 0.0]
    assert guard.take("k", 60, 2) == 1.0  # empty: one token a second at 60/min
    clock.now += 0.5
    assert guard.take("k", 60, 2) == 0.5
    clock.now += 10  # refills, but never above the burst
    assert [guard.take("k", 60, 2) for _ in range(3)] == [0.0, 0.0, 1.0]
    # a new policy is no fresh start: the empty bucket stays empty, then fills to the new
    # burst at the new rate (a lowered limit never hands out more than it had left)
    assert guard.take("k", 60, 5) == 1.0
    clock.now += 10
    assert [guard.take("k", 60, 5) for _ in range(6)] == [0.0] * 5 + [1.0]
    assert guard.take("k", 120, 1) == 0.5  # lowered: still empty, refilling at 2/s
    clock.now += 0.5
    assert guard.take("k", 120, 1) == 0.0
    clock.now += 60
    assert guard.take("k", 120, 3) == 0.0  # raised burst, carried over: 1 of 3 tokens
    assert guard.take("k", 120, 3) == 0.5


def test_rate_window_counts_per_minute_and_per_address() -> None:
    clock = FakeClock(1000.0)
    guard = GuardState(clock)
    assert [guard.count_rate("a") for _ in range(3)] == [1, 2, 3]
    assert guard.count_rate("b") == 1
    clock.now += 59.9
    assert guard.count_rate("a") == 4
    clock.now += 0.1  # a minute after the window began: a new one
    assert guard.count_rate("a") == 1


def test_remembered_scores_are_the_computed_ones() -> None:
    for _ in range(2):  # computed, then remembered
        assert score_request(b"/v1/models", b"", b"curl/8").points == 0
        assert score_request(b"/v1/models", b"", b"sqlmap/1.7").reasons == ("scanner_user_agent",)
        assert score_request(b"/a/../../etc/passwd", b"", b"").reasons == ("path_traversal",)
        assert (
            "sql_injection" in score_request(b"/v1/x", b"q=1%27%20or%20%271%27=%271", b"").reasons
        )
    long_agent = b"x" * 2000  # not kept, still scored
    assert score_request(b"/", b"", long_agent + b" nikto").points == 50


def test_unblocking_an_expired_block_resets_the_failure_count() -> None:
    from flm.core.policy import EffectivePolicy

    clock = FakeClock(1000.0)
    guard = GuardState(clock)
    policy = EffectivePolicy.build({"ip_blocklist": {"enabled": True}}, exposed=False)
    for _ in range(policy.max_failures):
        count, block = guard.auth_failure("9.9.9.9", policy)
    assert block is not None and block.until is not None
    row = ("9.9.9.9", "auth_failures", block.until, block.since, count)
    guard.load_blocks([row])
    clock.now = block.until + 1  # expired: no longer in force, still in the table
    guard.load_blocks([row])
    assert guard.blocked("9.9.9.9") is None and guard.failures["9.9.9.9"][0] == count
    guard.load_blocks([])  # the owner unblocked it
    assert "9.9.9.9" not in guard.failures
    assert guard.auth_failure("9.9.9.9", policy) == (1, None)


def test_backslash_and_overlong_traversal_forms_score() -> None:
    for raw in (b"/v1/..%5c..%5cwindows", b"/v1/..%255c..%255cx", b"/v1/%e0%80%ae%e0%80%ae/x"):
        assert score_request(raw, b"", b"").reasons == ("path_traversal",), raw
    assert score_request(b"/v1/models", b"q=a%5cb", b"").points == 0  # a lone backslash
