"""The per-key checks in isolation: scope matching, the ledger's buckets and budgets, the
usage chunk taken out of a stream, estimates for engines that report no usage."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from flm.core.errors import UsageError
from flm.core.keyscope import KeyScope, check_patterns, parse_expiry
from flm.http.asgi import header_pairs
from flm.openai.errors import HttpError
from flm.proxy.routes.chat import strip_usage
from flm.proxy.usage import KeyLedger, estimate_tokens
from flm.storage.usage import DAY_S
from flm.testing.emulators import start_emulator
from flm.testing.gateway import start_gateway
from tests.support import FakeClock


def _pairs(lines: bytes) -> dict[bytes, bytes]:
    """The header lines the ledger rendered, by name; each is one well-formed line."""
    assert lines.endswith(b"\r\n") and lines.count(b"\r\n") == len(header_pairs(lines))
    return dict(header_pairs(lines))


def test_scope_matches_exact_ids_and_globs() -> None:
    scope = KeyScope("k", "l", ("flm://ollama/*", "flm://vllm/qwen-?b", "flm://lm/exact"))
    assert scope.allows_model("flm://ollama/llama3:8b")
    assert scope.allows_model("flm://vllm/qwen-7b")
    assert not scope.allows_model("flm://vllm/qwen-14b")
    assert scope.allows_model("flm://lm/exact")
    assert not scope.allows_model("flm://lm/exact2")
    assert not scope.allows_model("flm://ollamax/m")
    assert scope.allows_engine("ollama") and not scope.allows_engine("vllm")
    assert not scope.allows_engine("lm")  # one model of an engine is not the engine
    everything = KeyScope("k", "l")
    assert everything.allows_model("flm://any/thing") and everything.allows_engine("any")
    # The request path asks by (engine, model), remembered per pair: the same answers.
    for _ in range(2):
        assert scope.allows("ollama", "llama3:8b") and scope.allows("vllm", "qwen-7b")
        assert not scope.allows("vllm", "qwen-14b") and not scope.allows("lm", "exact2")
        assert not scope.allows("ollamax", "m") and scope.allows("lm", "exact")
    slash = KeyScope("k", "l", ("flm://a/b/c",))  # (a model name may hold a slash)
    assert slash.allows("a", "b/c") and not slash.allows("a", "b")
    assert everything.allows("any", "thing")


@pytest.mark.parametrize(
    ("patterns", "kept"),
    [
        ([" flm://a/*", "flm://a/*"], ["flm://a/*"]),  # trimmed, de-duplicated
        (["flm://a/m:1", "flm://b/*"], ["flm://a/m:1", "flm://b/*"]),
        (["ollama/*"], None),
        (["flm://a"], None),
        (["flm:///m"], None),
        (["flm://A B/m"], None),
    ],
)
def test_model_patterns_are_checked(patterns: list[str], kept: list[str] | None) -> None:
    if kept is None:
        with pytest.raises(UsageError):
            check_patterns(patterns)
    else:
        assert check_patterns(patterns) == kept


def test_expiry_is_checked() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_expiry("30d", now) == "2026-01-31T00:00:00.000Z"
    assert parse_expiry("12h", now) == "2026-01-01T12:00:00.000Z"
    assert parse_expiry("2025-12-31", now) == "2025-12-31T00:00:00.000Z"
    with pytest.raises(UsageError):
        parse_expiry("soon", now)


def test_ledger_rpm_burst_and_tpm() -> None:
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    scope = KeyScope("k", "l", rpm=60, burst=2, tpm=600)
    first = _pairs(ledger.admit(scope))
    assert first[b"x-ratelimit-remaining-requests"] == b"1"
    assert first[b"x-ratelimit-limit-tokens"] == b"600"
    ledger.admit(scope)
    with pytest.raises(HttpError) as err:
        ledger.admit(scope)
    assert err.value.status == 429 and err.value.code == "rate_limited"
    assert dict(err.value.headers)[b"retry-after"] == b"1"
    clock.now += 1.0  # one request a second refills
    ledger.admit(scope)
    # tokens: a request that used more than the minute's tokens leaves a debt
    ledger.charge("k", 900, 600)
    clock.now += 5.0
    with pytest.raises(HttpError) as err:
        ledger.admit(scope)
    headers = dict(err.value.headers)
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert int(headers[b"retry-after"]) == 26  # 250 tokens owed (and one more) at 10 a second
    clock.now += 30.0
    assert _pairs(ledger.admit(scope))[b"x-ratelimit-remaining-tokens"] == b"50"


def test_ledger_headers_name_only_the_limits_a_key_has() -> None:
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    rpm_only = _pairs(ledger.admit(KeyScope("r", "l", rpm=120, burst=3)))
    assert rpm_only == {
        b"x-ratelimit-limit-requests": b"120",
        b"x-ratelimit-remaining-requests": b"2",
        b"x-ratelimit-reset-requests": b"500ms",  # one request back at two a second
    }
    tpm_only = _pairs(ledger.admit(KeyScope("t", "l", tpm=6000)))
    assert tpm_only == {
        b"x-ratelimit-limit-tokens": b"6000",
        b"x-ratelimit-remaining-tokens": b"6000",
        b"x-ratelimit-reset-tokens": b"0ms",
    }
    ledger.charge("t", 3000, 6000)
    assert _pairs(ledger.admit(KeyScope("t", "l", tpm=6000)))[b"x-ratelimit-reset-tokens"] == (
        b"30s"
    )
    assert ledger.admit(KeyScope("b", "l", daily_requests=5)) == b""


def test_ledger_headers_of_both_buckets_in_every_form() -> None:
    """A key with both buckets gets all six lines, each reset in milliseconds or as text on
    its own (one template when both are under a second, two otherwise)."""
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    fast = KeyScope("f", "l", rpm=600_000, burst=10, tpm=60_000)
    assert _pairs(ledger.admit(fast)) == {
        b"x-ratelimit-limit-requests": b"600000",
        b"x-ratelimit-remaining-requests": b"9",
        b"x-ratelimit-reset-requests": b"0ms",  # (one request back in 0.1 ms)
        b"x-ratelimit-limit-tokens": b"60000",
        b"x-ratelimit-remaining-tokens": b"60000",
        b"x-ratelimit-reset-tokens": b"0ms",
    }
    ledger.charge("f", 600, 60_000)  # 600 tokens back in 0.6 s
    both_ms = _pairs(ledger.admit(fast))
    assert both_ms[b"x-ratelimit-reset-requests"] == b"0ms"
    assert both_ms[b"x-ratelimit-remaining-tokens"] == b"59400"
    assert both_ms[b"x-ratelimit-reset-tokens"] == b"600ms"
    slow = KeyScope("s", "l", rpm=60, burst=5, tpm=600)
    requests_text = _pairs(ledger.admit(slow))
    assert requests_text[b"x-ratelimit-remaining-requests"] == b"4"
    assert requests_text[b"x-ratelimit-reset-requests"] == b"1s"
    assert requests_text[b"x-ratelimit-reset-tokens"] == b"0ms"
    ledger.charge("s", 300, 600)
    both_text = _pairs(ledger.admit(slow))
    assert both_text[b"x-ratelimit-reset-requests"] == b"2s"
    assert both_text[b"x-ratelimit-remaining-tokens"] == b"300"
    assert both_text[b"x-ratelimit-reset-tokens"] == b"30s"
    wide = KeyScope("w", "l", rpm=600_000, tpm=600)
    ledger.admit(wide)
    ledger.charge("w", 60, 600)
    tokens_text = _pairs(ledger.admit(wide))
    assert tokens_text[b"x-ratelimit-reset-requests"].endswith(b"ms")
    assert tokens_text[b"x-ratelimit-reset-tokens"] == b"6s"
    assert len(tokens_text) == 6


def test_ledger_daily_budgets_renew_at_midnight_utc() -> None:
    clock = FakeClock(20 * DAY_S + DAY_S - 100)
    ledger = KeyLedger(clock)
    scope = KeyScope("k", "l", daily_requests=2, daily_tokens=50)
    assert ledger.admit(scope) == b""
    ledger.charge("k", 30, None)
    ledger.admit(scope)
    with pytest.raises(HttpError) as err:
        ledger.admit(scope)
    assert err.value.code == "budget_exceeded"
    assert dict(err.value.headers)[b"retry-after"] == b"100"
    assert ledger.today("k") == (2, 30)
    clock.now += 100  # a new UTC day
    ledger.admit(scope)
    assert ledger.today("k") == (1, 0)
    ledger.load_today({"k": (0, 50)})  # (what the rollups say at start)
    with pytest.raises(HttpError) as err:
        ledger.admit(scope)
    assert "token budget" in err.value.message


def test_strip_usage_drops_only_what_include_usage_added() -> None:
    def ev(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode()

    content = ev({"choices": [{"delta": {"content": "hi"}}]})
    finish = ev({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None})
    usage = ev({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    batch = b"\n\n".join([content, finish, usage, b"data: [DONE]", b""])
    out = strip_usage(batch)
    assert b'"usage"' not in out
    assert out == b"\n\n".join(
        [content, ev({"choices": [{"delta": {}, "finish_reason": "stop"}]}), b"data: [DONE]", b""]
    )


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2


def test_engine_without_usage_is_estimated_and_marked(cli: Any) -> None:
    with start_emulator("vllm", models=["m"]) as emu:
        emu.behaviour.omit_usage = True
        cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        created = cli("api-keys", "create", "--label", "est").data
        import http.client

        with start_gateway() as gw:
            for stream in (False, True):
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
                conn.request(
                    "POST",
                    "/v1/chat/completions",
                    body=json.dumps(
                        {
                            "model": "flm://v/m",
                            "stream": stream,
                            "messages": [{"role": "user", "content": "x" * 400}],
                        }
                    ).encode(),
                    headers={
                        "Authorization": f"Bearer {created['key']}",
                        "Content-Type": "application/json",
                    },
                )
                resp = conn.getresponse()
                assert resp.status == 200
                resp.read()
                conn.close()
            gw.call(lambda: gw.runtime.usage.flush())
        rows = cli("usage", "--key", created["id"], "--by", "key").data["rows"]
    assert len(rows) == 1
    assert rows[0]["requests"] == 2 and rows[0]["estimated_requests"] == 2
    assert rows[0]["prompt_tokens"] == 200  # 400 characters, about 100 tokens each time
    assert rows[0]["completion_tokens"] > 0


def test_usage_sink_sums_by_minute_and_hour_and_prunes(flm_home: Any) -> None:
    from flm.core.paths import Paths
    from flm.proxy.usage import UsageSink
    from flm.storage import Storage

    storage = Storage(Paths.resolve())
    sink = UsageSink(storage.security, interval=3600)
    try:
        now = 1_800_000_000.0  # (a whole hour)
        old = now - 3 * DAY_S
        ancient = now - 91 * DAY_S
        for ts in (now, now + 30, now + 61, old, ancient):
            sink.record(ts, "k1", "flm://e/m", "e", 10, 5, False)
        sink.record(now, "k1", "flm://e/m", "e", 1, 1, True)
        assert sink.flush() == 6
        db = storage.security
        minutes = db.query(
            "SELECT minute, requests, prompt_tokens, completion_tokens, "
            "estimated FROM usage_minute ORDER BY minute"
        )
        assert [tuple(r) for r in minutes][-2:] == [
            (int(now // 60), 3, 21, 11, 1),
            (int((now + 61) // 60), 1, 10, 5, 0),
        ]
        hours = db.query("SELECT hour, requests FROM usage_hour ORDER BY hour")
        assert [tuple(r) for r in hours][-1] == (int(now // 3600), 4)
        sink.prune(now)
        left = db.query(
            "SELECT COUNT(*) FROM usage_minute WHERE minute < ?", (int((now - 48 * 3600) // 60),)
        )[0][0]
        assert left == 0
        hour_rows = [r[0] for r in db.query("SELECT hour FROM usage_hour")]
        assert int(old // 3600) in hour_rows and int(ancient // 3600) not in hour_rows
    finally:
        sink.close()
        storage.close()


@pytest.mark.parametrize("verdict", [True, False], ids=["idle-loop", "saturated-loop"])
def test_usage_is_summed_in_slices_with_pauses_and_sums_the_same(
    monkeypatch: pytest.MonkeyPatch, verdict: bool
) -> None:
    """The flusher sums a busy second's queue in slices with a pause between them (the loop
    would otherwise wait milliseconds for the GIL), until a pause reports a saturated loop;
    the minute and hour sums are those of the queue summed at once."""
    import random

    from flm.core import threads
    from flm.proxy import usage

    pauses = [0]

    def pause() -> bool:
        pauses[0] += 1
        return verdict

    monkeypatch.setattr(threads, "pause", pause)
    rng = random.Random(7)
    start = 1_800_000_000.0
    batch = [
        (
            start + i * 1.3,
            f"k{key}",
            f"m{rng.randrange(2)}",
            "e",
            rng.randrange(50),
            rng.randrange(50),
            rng.randrange(2),
            f"label-{key}",
        )
        for i in range(usage.SLICE * 5 + 7)
        for key in [rng.randrange(3)]
    ]
    minutes, hours, last_used, tokens = usage._sums(batch, pause=True)
    assert pauses[0] == (5 if verdict else 1)
    for unit, sums in ((60, minutes), (3600, hours)):
        expected: dict[tuple[int, str, str, str], list[int]] = {}
        for ts, key, model, engine, prompt, completion, estimated, _ in batch:
            row = expected.setdefault((int(ts // unit), key, model, engine), [0, 0, 0, 0])
            for i, value in enumerate((1, prompt, completion, estimated)):
                row[i] += value
        assert sums == expected
    assert last_used == {k: max(ts for ts, key, *_ in batch if key == k) for k in last_used}
    assert len(last_used) == 3
    by_label: dict[tuple[str, str], list[int]] = {}
    for _, _key, model, _, prompt, completion, _, label in batch:
        if prompt or completion:
            pair = by_label.setdefault((label, model), [0, 0])
            pair[0] += prompt
            pair[1] += completion
    assert tokens == by_label and {label for label, _ in tokens} == {
        "label-0",
        "label-1",
        "label-2",
    }
    pauses[0] = 0
    usage._sums(batch, pause=False)
    assert pauses[0] == 0


def test_usage_sink_keeps_a_batch_it_cannot_write_and_writes_it_later(
    flm_home: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from flm.core.paths import Paths
    from flm.proxy.usage import UsageSink
    from flm.storage import Storage

    storage = Storage(Paths.resolve())
    reported: list[tuple[str, str, int, int]] = []
    sink = UsageSink(storage.security, interval=3600, on_tokens=lambda *sums: reported.append(sums))
    db = storage.security
    try:
        # (a real SQLite failure on the write, as a full disk gives)
        db.write(
            lambda c: c.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON usage_minute "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        )
        now = 1_800_000_000.0
        for i in range(5):
            sink.record(now + i, "k1", "flm://e/m", "e", 10, 5, False, "friend")
        with caplog.at_level("ERROR", logger="flm.usage"), pytest.raises(Exception, match="full"):
            sink.flush()
        assert "5 requests kept for a retry" in caplog.text
        assert reported == []  # (the metrics count what is written, once)
        assert db.query("SELECT COUNT(*) FROM usage_minute")[0][0] == 0
        sink.record(now + 10, "k1", "flm://e/m", "e", 1, 1, False, "friend")
        db.write(lambda c: c.execute("DROP TRIGGER refuse"))
        assert sink.flush() == 6
        assert reported == [("friend", "flm://e/m", 51, 26)]
        row = db.query("SELECT SUM(requests), SUM(prompt_tokens) FROM usage_minute")[0]
        assert tuple(row) == (6, 51)
    finally:
        sink.close()
        storage.close()


def test_usage_sink_bounds_what_it_keeps_for_a_retry(flm_home: Any) -> None:
    from flm.core.paths import Paths
    from flm.proxy import usage
    from flm.storage import Storage

    storage = Storage(Paths.resolve())
    sink = usage.UsageSink(storage.security, interval=3600)
    try:
        items = [(float(i), "k", "m", "e", 1, 1, 0, "l") for i in range(10)]
        old_cap = usage.MAX_PENDING
        usage.MAX_PENDING = 4
        try:
            sink._keep_for_retry(items, OSError("disk full"))
        finally:
            usage.MAX_PENDING = old_cap
        assert sink.dropped == 6
        assert [it[0] for it in sink._items] == [6.0, 7.0, 8.0, 9.0]
    finally:
        sink._items.clear()
        sink.close()
        storage.close()


def test_usage_queue_is_bounded(flm_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from flm.proxy import usage

    monkeypatch.setattr(usage, "MAX_PENDING", 5)
    sink = usage.UsageSink(None, interval=3600)
    try:
        for i in range(50):
            sink.record_item((float(i), "k", "m", "e", 1, 1, 0))
        assert len(sink._items) == 5
        assert [it[0] for it in sink._items] == [45.0, 46.0, 47.0, 48.0, 49.0]
    finally:
        sink.close()


def test_ledger_admit_counts_every_request_and_takes_back_the_uncounted() -> None:
    """admit counts each request it lets in toward the daily requests (in flight included);
    an exhausted budget still lets model listings and /metrics through, and uncount takes
    such a request back when it ends."""
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    scope = KeyScope("k", "l", daily_requests=2)
    ledger.admit(scope, "/v1/chat/completions")
    ledger.admit(scope, "/v1/models")
    assert ledger.today("k") == (2, 0)
    for path in ("/v1/models", "/v1/models/flm://e/m", "/metrics"):
        ledger.admit(scope, path)
        KeyLedger.uncount(scope)
    with pytest.raises(HttpError) as err:
        ledger.admit(scope, "/v1/chat/completions")
    assert err.value.code == "budget_exceeded"
    KeyLedger.uncount(scope)  # (the listing above ends)
    ledger.admit(scope, "/v1/chat/completions")
    assert ledger.today("k") == (2, 0)


def test_ledger_admit_refuses_an_expired_key_with_limits() -> None:
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    scope = KeyScope("k", "l", rpm=60, expires_at=1_000_010.0)
    assert scope.admit_only
    ledger.admit(scope, "/v1/chat/completions")
    clock.now += 10.0
    with pytest.raises(HttpError) as err:
        ledger.admit(scope, "/v1/chat/completions")
    assert (err.value.status, err.value.code) == (401, "key_expired")
    assert ledger.today("k") == (1, 0)  # (a refused request is not counted)
    assert not KeyScope("r", "l", rpm=60, read_only=True).admit_only


def test_ledger_spend_charges_the_bucket_as_it_was_last_read() -> None:
    """spend takes a finished request's tokens off the token bucket as admit last read it:
    exact while the bucket refills below its capacity; a request that ran while the bucket
    was full is charged as of its admission. A key never let in is charged by charge."""
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    scope = KeyScope("k", "l", tpm=600, daily_tokens=10_000)  # 10 tokens a second
    ledger.admit(scope)  # (full: 600)
    ledger.spend(scope, 400)  # (ends at once: 200 left)
    clock.now += 2.0
    lines = _pairs(ledger.admit(scope))  # (read again: 220)
    assert lines[b"x-ratelimit-remaining-tokens"] == b"220"
    clock.now += 2.0
    ledger.spend(scope, 300)  # (-80 as of the last reading, 2 s ago: -60 now)
    assert ledger.today("k") == (2, 700)
    with pytest.raises(HttpError) as err:
        ledger.admit(scope)
    assert dict(err.value.headers)[b"retry-after"] == b"7"  # (61 tokens at 10 a second)
    clock.now += 70.0
    assert ledger.admit(scope) == scope.full_lines  # (full again)
    clock.now += 31.0
    ledger.spend(scope, 900)  # (a request of 31 s: charged as of its admission)
    lines = _pairs(ledger.admit(scope))
    assert lines[b"x-ratelimit-remaining-tokens"] == b"10"  # (600 - 900 + 310)
    unattached = KeyScope("u", "l", tpm=600)
    ledger.spend(unattached, 10)  # (never let in: charged by id)
    assert ledger.today("u") == (0, 10)


@pytest.mark.parametrize(
    ("rpm", "burst", "tpm", "expected"),
    [
        (120, 3, None, {b"remaining-requests": b"2", b"reset-requests": b"500ms"}),
        (60, 5, 600, {b"remaining-requests": b"4", b"reset-requests": b"1s"}),
        (30, None, 900, {b"remaining-requests": b"29", b"reset-requests": b"2s"}),
        (1, None, None, {b"remaining-requests": b"0", b"reset-requests": b"1m0s"}),
        (600_000, 10, 60_000, {b"remaining-requests": b"9", b"reset-requests": b"0ms"}),
    ],
)
def test_a_request_into_full_buckets_gets_the_lines_rendered_at_load(
    rpm: int, burst: int | None, tpm: int | None, expected: dict[bytes, bytes]
) -> None:
    """A key's first request finds its buckets full and takes the lines its scope rendered
    when it was loaded; they say what the arithmetic would: one request used, back in
    1/rate seconds, every token left. The next request at the same instant (a bucket no
    longer full) is rendered from the counters, one request fewer."""
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    scope = KeyScope("k", "l", rpm=rpm, burst=burst, tpm=tpm)
    first = ledger.admit(scope, "/v1/chat/completions")
    assert first == scope.full_lines
    got = {name.removeprefix(b"x-ratelimit-"): value for name, value in _pairs(first).items()}
    want = {b"limit-requests": str(rpm).encode(), **expected}
    if tpm is not None:
        want |= {
            b"limit-tokens": str(tpm).encode(),
            b"remaining-tokens": str(tpm).encode(),
            b"reset-tokens": b"0ms",
        }
    assert got == want
    if (burst or rpm) > 1:
        second = _pairs(ledger.admit(scope, "/v1/chat/completions"))
        left = int(expected[b"remaining-requests"]) - 1
        assert second[b"x-ratelimit-remaining-requests"] == str(left).encode()


def test_a_limit_taken_away_leaves_no_bucket_behind() -> None:
    """The counters outlive a reload's scopes: a key whose tpm is taken away while it owes
    tokens, and which gets an rpm instead, is judged by its new scope alone (the old debt
    neither refuses it nor keeps it off the rendered lines), and a tpm given back starts
    full."""
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    before = KeyScope("k", "l", tpm=600)
    ledger.admit(before)
    ledger.spend(before, 5_000)  # (a debt of 4,400 tokens)
    with pytest.raises(HttpError):
        ledger.admit(before)
    after = KeyScope("k", "l", rpm=60, burst=2)  # (what the next reload builds)
    assert ledger.admit(after) == after.full_lines
    lines = _pairs(ledger.admit(after))
    assert lines[b"x-ratelimit-remaining-requests"] == b"0"
    assert b"x-ratelimit-remaining-tokens" not in lines
    again = KeyScope("k", "l", tpm=900)
    clock.now += 1.0
    assert ledger.admit(again) == again.full_lines
    assert ledger.today("k") == (4, 5_000)


def test_the_ledger_reports_each_429_it_answers_and_no_401() -> None:
    """``on_refusal`` (the runtime's ``flm_rate_limited_total{scope="key"}``) hears of every
    rate or budget refusal, and not of an expired key."""
    clock = FakeClock(1_000_000.0)
    ledger = KeyLedger(clock)
    refusals: list[int] = []
    ledger.on_refusal = lambda: refusals.append(1)
    rate = KeyScope("r", "l", rpm=60, burst=1)
    ledger.admit(rate)
    with pytest.raises(HttpError):
        ledger.admit(rate)
    budget = KeyScope("b", "l", daily_requests=1)
    ledger.admit(budget)
    with pytest.raises(HttpError):
        ledger.admit(budget)
    assert len(refusals) == 2
    expired = KeyScope("e", "l", rpm=60, expires_at=clock.now - 1)
    with pytest.raises(HttpError) as err:
        ledger.admit(expired)
    assert err.value.code == "key_expired" and len(refusals) == 2
