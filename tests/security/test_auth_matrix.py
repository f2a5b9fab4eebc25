"""Acceptance 1: hundreds of crafted requests over every route; none gets through."""

from __future__ import annotations

import itertools
import json
from typing import Any

from tests.security.conftest import Env

ROUTES = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/audio/speech"),
    ("GET", "/engine/eng/v1/models"),
    ("POST", "/engine/eng/v1/chat/completions"),
    ("GET", "/metrics-not"),
    ("GET", "/nope"),
]
PATH_TRICKS = [
    "{p}",
    "{p}/",
    "/{p}",
    "{p}?x=1",
    "/v1/..%2f{p}",
    "/%2e%2e{p}",
    "{p}%00",
    "/v1/./{p}",
]


def _variants(env: Env, revoked: str, rotated_away: str, stored_hash: str) -> list[dict[str, Any]]:
    good = env.key
    return [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic " + good},
        {"Authorization": good},
        {"Authorization": "Bearer " + good[:-1]},
        {"Authorization": "Bearer " + good + "x"},
        {"Authorization": "Bearer " + good.upper()},
        {"Authorization": "Bearer " + revoked},
        {"Authorization": "Bearer " + rotated_away},
        {"Authorization": "Bearer " + stored_hash},
        {"AUTHORIZATION": "bearer flm_0123456789abcdef_" + "A" * 43},
        {"X-Api-Key": good},
        {"Cookie": f"api_key={good}"},
        {"Authorization": "Bearer " + good.replace("flm_", "flm-")},
        {"authorization": "Bearer flm_ffffffffffffffff_" + "B" * 43},
        {"AuThOrIzAtIoN": "BEARER flm_0000000000000000_" + "C" * 43},
        {"Authorization": "Bearer " + "A" * 300},
        {"Authorization": "Bearer flm_" + good.split("_")[1] + "_"},
    ]


def test_crafted_requests_never_get_through(env: Env) -> None:
    import sqlite3

    cli = env.cli
    revoked = cli("api-keys", "create", "--label", "r").data
    cli("api-keys", "revoke", revoked["id"])
    old = cli("api-keys", "create", "--label", "o").data
    cli("api-keys", "rotate", old["id"])
    active = {k["id"] for k in cli("api-keys", "list").data if k["status"] == "active"}
    env.gw.call(lambda: env.rt.keys.retain_only(active))
    from flm.core.paths import Paths

    conn = sqlite3.connect(Paths.resolve().security_db)
    stored_hash = conn.execute("SELECT hash FROM api_keys LIMIT 1").fetchone()[0]
    conn.close()
    # every botnet layer on, so blocks also show up as refusals (403)
    env.policy(
        {
            "ip_blocklist": {"enabled": True},
            "intrusion_detection": {"enabled": True},
            "honeypot": {"enabled": True},
        }
    )
    seen_before = len(env.emu.requests)
    statuses: list[int] = []
    count = 0
    sources = itertools.cycle(f"127.0.{i}.{j}" for i in range(1, 60) for j in range(2, 200))
    variants = _variants(env, revoked["key"], old["key"], stored_hash)
    for (method, path), headers in itertools.product(ROUTES, variants):
        status, _, _ = env.request(
            method,
            path,
            headers=headers,
            key=None,
            body={"model": "flm://eng/m:1"} if method == "POST" else None,
            source=next(sources),
        )
        statuses.append(status)
        count += 1
    for (method, path), trick in itertools.product(ROUTES, PATH_TRICKS):
        target = trick.format(p=path.lstrip("/") if trick.startswith("/") else path)
        if not target.startswith("/"):
            target = "/" + target
        status, _, _ = env.request(
            method, target, key=None, headers={"Authorization": "Bearer nope"}, source=next(sources)
        )
        statuses.append(status)
        count += 1
    # a valid key in the query string or duplicated headers is still refused
    for method, path in ROUTES:
        for query in (
            f"?api_key={env.key}",
            f"?key={env.key}",
            f"?authorization=Bearer%20{env.key}",
        ):
            status, _, _ = env.request(method, path + query, key=None, source=next(sources))
            statuses.append(status)
            count += 1
    assert count >= 300
    unexpected = [s for s in statuses if s not in (401, 403, 404)]
    assert unexpected == [], unexpected
    assert len(env.emu.requests) == seen_before  # nothing reached the engine
    # duplicated Authorization headers (one valid) are refused too
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(env.gw.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            (
                f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.key}"
                f"\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401")
    # and the key itself still works where it should
    status, _, body = env.request("GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"]
