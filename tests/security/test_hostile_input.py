"""Client-controlled text never breaks the metrics or the audit (issue 17, finding 1): model
ids are validated before they are used anywhere, metrics labels are bounded, and a hostile
request leaves every other request's audit row in place."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.security.conftest import Env

MESSAGES = [{"role": "user", "content": "hi"}]


def _request_ids(home: Path) -> set[str]:
    conn = sqlite3.connect(home / "security.db")
    try:
        return {
            r[0]
            for r in conn.execute("SELECT request_id FROM audit_logs WHERE event_type = 'request'")
        }
    finally:
        conn.close()


def wait_for_rows(env: Env, home: Path, wanted: set[str]) -> None:
    """Poll (flushing the sink) until every request id in ``wanted`` has its audit row."""
    deadline = time.monotonic() + 15
    while True:
        env.rt.audit.flush()  # type: ignore[union-attr]
        missing = wanted - _request_ids(home)
        if not missing:
            return
        assert time.monotonic() < deadline, f"audit rows missing: {sorted(missing)[:5]}"
        time.sleep(0.02)


def _raw_chat(env: Env, body: bytes) -> tuple[int, dict[str, str], bytes]:
    return env.request(
        "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
    )


def test_lone_surrogates_in_the_model_id_are_refused_and_metrics_stay_readable(
    env: Env, flm_home: Path
) -> None:
    ids = set()
    # (JSON escapes: the body is valid JSON whose text holds a lone UTF-16 surrogate)
    for model in (
        rb"flm://\ud800/x",
        rb"flm://eng/\ud800",
        rb"flm://eng/m\u0000:1",
        rb"flm://eng/" + b"a" * 600,
        rb"flm://Eng\u001b[31m/x",
    ):
        status, headers, body = _raw_chat(
            env, b'{"model":"' + model + b'","messages":[{"role":"user","content":"x"}]}'
        )
        assert status == 400, (model, body)
        assert json.loads(body)["error"]["code"] == "invalid_model"
        ids.add(headers["x-request-id"])
    status, headers, _ = env.chat()
    assert status == 200
    ids.add(headers["x-request-id"])
    status, _, text = env.request("GET", "/metrics")
    assert status == 200, text[:300]
    assert b'engine="eng"' in text
    wait_for_rows(env, flm_home, ids)
    # ... and /metrics is still readable after the rows were written
    assert env.request("GET", "/metrics")[0] == 200


def test_a_model_id_without_the_flm_scheme_is_refused(env: Env) -> None:
    before = len(env.emu.requests)
    for model in ("flm:/eng/m:1", "FLM://eng/m:1", "flm://eng", "flm:///m:1", "flm:eng/m:1"):
        status, _, body = env.request(
            "POST", "/v1/chat/completions", body={"model": model, "messages": MESSAGES}
        )
        assert status == 400, model
        assert json.loads(body)["error"]["code"] == "invalid_model", model
    # without the scheme it is a plain model name: never routed to the engine "eng"
    status, _, body = env.request(
        "POST", "/v1/chat/completions", body={"model": "eng/m:1", "messages": MESSAGES}
    )
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "model_not_found"
    assert not [r for r in env.emu.requests[before:] if "chat" in r[1]]


def test_metrics_labels_are_bounded_and_escaped() -> None:
    from flm.proxy.metrics import MAX_LABEL, Metrics

    metrics = Metrics()
    metrics.record_request("/v1/x", 200, "\ud800" * 1000, 0.01, 0.001)
    metrics.record_request("/v1/x", 200, "a\nb\x00", 0.01, None)
    metrics.record_ttft("\udfff", 0.1)
    metrics.record_tokens("\x1b[31m", 1, 2)
    from prometheus_client.parser import text_string_to_metric_families

    seen = 0
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            for value in sample.labels.values():
                seen += 1
                assert len(value) <= MAX_LABEL and value.isprintable(), value
    assert seen > 6


def _raw(env: Env, data: bytes, source: str = "127.0.0.1") -> bytes:
    parts = urlsplit(env.gw.url)
    with socket.create_connection(
        (parts.hostname, parts.port), timeout=10, source_address=(source, 0)
    ) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


#: Any character, with lone surrogates, control and format characters made likely.
_HOSTILE_CHARS = st.one_of(
    st.characters(),
    st.sampled_from(
        [
            "\ud800",
            "\udbff",
            "\udc00",
            "\udfff",
            "\x00",
            "\x1b",
            "\n",
            "\r",
            "\x7f",
            "\u2028",
            "\u202e",
            "\ufeff",
            "\uffff",
            "\U0010ffff",
            "\\",
            '"',
        ]
    ),
)
_HOSTILE = st.lists(_HOSTILE_CHARS, max_size=48).map("".join)


def _header_bytes(text: str) -> bytes:
    """``text`` as a header value's bytes (what a client can put on the wire: anything but
    the line ends and NUL that end or break the header)."""
    raw = text.encode("utf-8", "surrogatepass")
    return raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"") or b"x"


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(model=_HOSTILE, path=_HOSTILE, agent=_HOSTILE, header=_HOSTILE)
@example(model="\ud800/x", path="", agent="", header="")
@example(model="eng/\ud800", path="v1/\x00\ud800", agent="sqlmap\udfff\x1b", header="\u202e")
def test_fuzzed_client_fields_never_break_metrics_or_neighbours_audit_rows(
    env: Env, flm_home: Path, model: str, path: str, agent: str, header: str
) -> None:
    # (one gateway serves every example: the rows of earlier neighbours must stay too)
    neighbours: set[str] = env.__dict__.setdefault("neighbours", set())
    if not env.__dict__.setdefault("hostile_policy", False):
        env.policy(
            {
                "intrusion_detection": {"enabled": True},
                "honeypot": {"enabled": True},
                "anomaly_detection": {"enabled": True, "request_rate_threshold": 100000},
            }
        )
        env.hostile_policy = True  # type: ignore[attr-defined]
    # (json.dumps escapes every lone surrogate and control character: the body is valid JSON)
    body = json.dumps({"model": "flm://" + model, "messages": MESSAGES}).encode()
    target = "/" + quote(path.encode("utf-8", "surrogatepass"), safe="/?=&")
    request = (
        b"POST " + target.encode("ascii") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + env.key.encode() + b"\r\n"
        b"User-Agent: " + _header_bytes(agent) + b"\r\n"
        b"X-Request-Id: " + _header_bytes(header) + b"\r\n"
        b"Origin: " + _header_bytes(header) + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    reply = _raw(env, request, source="127.0.0.2")
    assert reply.startswith(b"HTTP/1.1 "), reply[:100]
    assert not reply.startswith(b"HTTP/1.1 500"), reply[:300]
    # the model on the chat route, the same fields again through the pass-through prefix
    chat = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + env.key.encode() + b"\r\n"
        b"User-Agent: " + _header_bytes(agent) + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    reply = _raw(env, chat, source="127.0.0.2")
    assert not reply.startswith(b"HTTP/1.1 500"), reply[:300]
    status, headers, _ = env.chat()
    assert status == 200
    neighbours.add(headers["x-request-id"])
    status, _, text = env.request("GET", "/metrics")
    assert status == 200, text[:300]
    wait_for_rows(env, flm_home, neighbours)
