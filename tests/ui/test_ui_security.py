"""The web UI's own security rules, each over real sockets against a real daemon."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from flm.ui.sessions import LOGIN_TTL_S, SessionStore
from tests.support import FakeClock
from tests.ui.conftest import Ui

PAGES = (
    "/",
    "/api",
    "/chat",
    "/wizard",
    "/security",
    "/profiles",
    "/settings",
    "/data/dashboard",
    "/security/export",
)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_no_session_is_401_everywhere(ui: Ui) -> None:
    for path in PAGES:
        assert ui.request("GET", path).status == 401, path
    assert ui.request("GET", "/", headers={"Cookie": "flm_ui=made-up"}).status == 401
    posted = ui.request(
        "POST",
        "/api/keys",
        body=b"label=x",
        headers={"Origin": ui.origin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert posted.status == 401
    # the admin API beside it still wants its bearer token
    assert ui.request("GET", "/admin/status").status == 401
    assert ui.request("POST", "/admin/ui-login", body=b"{}").status == 401


def test_wrong_host_is_misdirected(ui: Ui) -> None:
    session = ui.login()
    for host in (
        "evil.example",
        f"evil.example:{ui.port}",
        f"127.0.0.1:{ui.port + 1}",
        "localhost",
        f"192.168.1.5:{ui.port}",
    ):
        reply = ui.request("GET", "/", host=host, headers={"Cookie": session.cookie})
        assert reply.status == 421, host
        assert b"csrf" not in reply.body
    # a rebinding page cannot even spend a login token
    url = ui.new_login_url()
    assert ui.request("GET", _path(url), host=f"attacker.test:{ui.port}").status == 421
    for host in (f"127.0.0.1:{ui.port}", f"localhost:{ui.port}", f"[::1]:{ui.port}"):
        assert (
            ui.request("GET", "/", host=host, headers={"Cookie": session.cookie}).status == 200
        ), host


def test_login_token_single_use_and_cookie_flags(ui: Ui) -> None:
    first = ui.request("GET", _path(ui.login_url))
    assert first.status == 303 and first.headers["location"] == "/"
    cookie = first.cookies[0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    token = urlsplit(ui.login_url).query.split("=", 1)[1]
    assert value != token and len(value) >= 40
    again = ui.request("GET", _path(ui.login_url))
    assert again.status == 401 and not again.cookies
    assert ui.request("GET", "/login?token=guessed").status == 401


def test_login_token_expires() -> None:
    clock = FakeClock(1000.0)
    store = SessionStore(clock=clock)
    token = store.new_login_token()
    clock.now += LOGIN_TTL_S + 1
    assert store.redeem(token) is None
    fresh = store.new_login_token()
    redeemed = store.redeem(fresh)
    assert redeemed is not None
    sid, _ = redeemed
    assert store.get(sid) is not None
    clock.now += 31 * 60  # idle past the limit
    assert store.get(sid) is None and not store.live()


def test_state_changes_need_origin_and_csrf(ui: Ui) -> None:
    session = ui.login()
    cross = session.post("/api/keys", {"label": "x"}, origin="https://evil.example")
    assert cross.status == 403
    missing = session.post("/api/keys", {"label": "x"}, origin=None)
    assert missing.status == 403
    no_token = session.post("/api/keys", {"label": "x"}, csrf=False)
    assert no_token.status == 403
    wrong = session.post("/api/keys", {"label": "x", "csrf": "forged"}, csrf=False)
    assert wrong.status == 403
    keys = session.get("/api")
    assert 'data-key-status="active"' not in keys.text  # none of those made a key
    made = session.post("/api/keys", {"label": "good"})
    assert made.status == 200, made.text
    # nothing changes state on GET
    assert session.get("/api/keys").status == 404


def test_headers_are_strict(ui: Ui) -> None:
    session = ui.login()
    reply = session.get("/")
    csp = reply.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert reply.headers["x-frame-options"] == "DENY"
    # (no-referrer would make form POSTs send "Origin: null")
    assert reply.headers["referrer-policy"] == "same-origin"
    assert reply.headers["cache-control"] == "no-store"
    # no inline script: every <script> is the shipped file or an inert JSON data block
    for tag in re.findall(r"<script[^>]*>", reply.text):
        assert 'src="/static/ui.js"' in tag or 'type="application/json"' in tag, tag
    assert " on" not in " ".join(re.findall(r"<[^>]+ on[a-z]+=", reply.text))


def test_logout_ends_the_session_on_the_server(ui: Ui) -> None:
    session = ui.login()
    out = session.post("/logout", {}, accept_json=False)
    assert out.status == 200
    assert any("Max-Age=0" in c for c in out.cookies)
    # the old cookie, replayed, is dead
    assert session.get("/").status == 401
    assert session.get("/data/dashboard").status == 401


def test_key_plaintext_shown_once_never_stored_or_logged(ui: Ui) -> None:
    session = ui.login()
    made = session.post("/api/keys", {"label": "laptop"})
    assert made.status == 200 and made.headers["cache-control"] == "no-store"
    data = made.json["data"]  # type: ignore[index]
    plaintext = data["plaintext"]
    assert plaintext.startswith("flm_") and plaintext in data["snippets"]["curl"]
    page = session.get("/api")
    assert data["key"]["id"] in page.text and plaintext not in page.text
    secret = plaintext.split("_", 2)[2]  # flm_<hex id>_<secret; may hold "_">
    assert len(secret) >= 40
    for path in ui.home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    rotated = session.post("/api/keys/rotate", {"id": data["key"]["id"]})
    assert rotated.status == 200
    assert rotated.json["data"]["plaintext"] != plaintext  # type: ignore[index]


def test_policy_json_names_the_offending_field(ui: Ui) -> None:
    session = ui.login()
    bad = session.post("/api/policy/json", {"policy": '{"rate_limit": {"rpm": "lots"}}'})
    assert bad.status == 400
    message = bad.json["error"]["message"]  # type: ignore[index]
    assert "rate_limit" in message and "rpm" in message
    bad_form = session.post("/api/policy", {"ip_whitelist": "10.0.0.0/8\nnot-an-ip"})
    assert bad_form.status == 400
    assert "ip_whitelist" in bad_form.json["error"]["message"]  # type: ignore[index]
    good = session.post("/api/policy", {"ip_whitelist": "10.0.0.0/8\nfd00::/8", "rpm": "60"})
    assert good.status == 200, good.text
    shown = session.get("/api").text
    assert "fd00::/8" in shown
