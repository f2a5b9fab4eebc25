"""The UI's pages and actions over real sockets: daemon lifetime, security views with filters
and paging, editors, the wizard's refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flm.services.runstate import pid_alive
from tests.conftest import flm_subprocess
from tests.ui.conftest import Ui


def _daemon_pid(home: Path) -> int:
    return int(json.loads((home / "run" / "proxy-daemon.json").read_text())["pid"])


def test_daemon_stays_up_while_a_ui_session_is_live(ui: Ui, emulator: str) -> None:
    session = ui.login()
    pid = _daemon_pid(ui.home)
    started = session.post("/proxies/start", {"port": "0", "mode": "local-http"})
    assert started.status == 400  # port 0 is refused with a message, nothing started
    assert "port" in started.json["error"]["message"]  # type: ignore[index]
    status = json.loads(flm_subprocess("proxy", "status").stdout)["data"]
    assert status["proxies"] == []
    # the CLI stops every proxy; the daemon keeps serving the open UI
    assert flm_subprocess("proxy", "stop", "--all").returncode == 0
    assert pid_alive(pid)
    assert session.get("/").status == 200
    from flm.core.paths import Paths
    from flm.daemon.main import Daemon

    # the rule itself, on a real (not started) daemon object
    daemon = Daemon(Paths.resolve())
    try:
        assert daemon._idle()
        daemon.ui.login_url()  # an unspent login link keeps it up
        assert not daemon._idle()
    finally:
        daemon.ctx.close()


def test_dashboard_data_endpoint_serves_fragments(ui: Ui, emulator: str) -> None:
    session = ui.login()
    reply = session.get("/data/dashboard", Accept="application/json")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    fragments = reply.json["fragments"]  # type: ignore[index]
    assert set(fragments) == {"engines", "proxies", "summary", "charts"}
    assert 'data-engine="emu"' in fragments["engines"]
    for kind in ("requests", "latency", "refusals", "keys", "engines"):
        assert f'data-chart="{kind}"' in fragments["charts"], kind
    assert 'data-chart="health"' in fragments["engines"]  # the engine's health sparkline
    day = session.get("/data/dashboard?range=day", Accept="application/json")
    assert 'aria-current="true">Last day' in day.json["fragments"]["charts"]  # type: ignore[index]


def test_security_view_filters_and_pages(ui: Ui) -> None:
    from flm.core.paths import Paths
    from flm.core.timeutil import now_iso
    from flm.storage import Storage

    storage = Storage(Paths.resolve())
    rows = [
        (
            now_iso(),
            f"req-{i:03d}",
            f"192.0.2.{i % 3}",
            "auth_failure" if i % 2 else "request",
            "medium" if i % 2 else "info",
        )
        for i in range(130)
    ]
    storage.security.write(
        lambda c: c.executemany(
            "INSERT INTO audit_logs(ts, request_id, client_ip, event_type, severity) "
            "VALUES (?, ?, ?, ?, ?)",
            rows,
        )
    )
    storage.close()
    session = ui.login()
    first = session.get("/security?tab=audit&event_type=auth_failure")
    ids = re.findall(r"req-(\d{3})", first.text)
    assert len(ids) == 50 and all(int(i) % 2 for i in ids)
    assert 'rel="next"' in first.text and "event_type=auth_failure" in first.text
    # (the table's sort buttons order the page shown, and the page says so)
    assert 'id="sort-scope"' in first.text and "this page only" in first.text
    second = session.get("/security?tab=audit&event_type=auth_failure&page=2")
    assert set(re.findall(r"req-(\d{3})", second.text)).isdisjoint(ids)
    only_ip = session.get("/security?tab=audit&ip=192.0.2.1")
    assert set(re.findall(r"<code>(192\.0\.2\.\d)</code>", only_ip.text)) == {"192.0.2.1"}
    export = session.get("/security/export?format=json&event_type=auth_failure")
    assert export.status == 200, export.headers
    exported = export.json
    assert isinstance(exported, list) and len(exported) == 65
    assert {r["event_type"] for r in exported} == {"auth_failure"}


def test_profiles_and_prompts_editors(ui: Ui) -> None:
    session = ui.login()
    bad = session.post(
        "/profiles/save",
        {"engine_id": "emu", "model_id": "tiny:1b", "label": "warm", "parameters": "{not json"},
    )
    assert bad.status == 400
    assert bad.json["error"]["field"] == "parameters"  # type: ignore[index]
    saved = session.post(
        "/profiles/save",
        {
            "engine_id": "emu",
            "model_id": "tiny:1b",
            "label": "warm",
            "parameters": '{"temperature": 0.2}',
        },
    )
    assert saved.status == 200, saved.text
    page = session.get("/profiles").text
    assert "warm" in page and "0.2" in page
    prompt = session.post(
        "/prompts/save", {"api_id": "chat_completions", "template": "Answer briefly."}
    )
    assert prompt.status == 200
    assert "Answer briefly." in session.get("/profiles").text
    wrong = session.post("/prompts/save", {"api_id": "nope", "template": "x"})
    assert wrong.status == 400


def test_wizard_warns_and_never_applies_without_confirmation(ui: Ui) -> None:
    session = ui.login()
    step3 = session.get("/wizard?step=3&mode=local-http&port=8080&bind=0.0.0.0")
    assert 'data-warning="wizard.warn_empty_allow_list"' in step3.text
    session.post("/api/policy", {"ip_whitelist": "192.168.0.0/16\nfd00::/8"})
    step3 = session.get("/wizard?step=3&mode=local-http&port=8080&bind=0.0.0.0")
    assert 'data-warning="wizard.warn_private_only"' in step3.text
    step4 = session.get("/wizard?step=4&mode=dev-selfsigned&port=8080&bind=0.0.0.0")
    assert "8080, 8081" in step4.text and "fd00::/8" in step4.text
    for backend in ("ufw", "firewalld", "nftables", "pf", "powershell"):
        assert f'data-backend="{backend}"' in step4.text
    refused = session.post("/wizard/apply", {"backend": "nftables", "ports": "8080,8081"})
    assert refused.status == 400 and refused.json["error"]["field"] == "confirm"  # type: ignore[index]
    other = session.post("/wizard/apply", {"backend": "pf", "ports": "8080", "confirm": "yes"})
    assert other.status == 400
    assert not (ui.home / "logs" / "security").exists()


def test_settings_store_language_and_theme(ui: Ui) -> None:
    session = ui.login()
    first = session.get("/", **{"Accept-Language": "ja,en;q=0.5"})
    assert '<html lang="ja" data-theme="system">' in first.text
    assert session.post("/settings", {"language": "en", "theme": "dark"}).status == 200
    again = session.get("/", **{"Accept-Language": "ja,en;q=0.5"})
    assert '<html lang="en" data-theme="dark">' in again.text  # the stored choice wins
    out = json.loads(flm_subprocess("config", "get", "preferred_language").stdout)["data"]
    assert out["value"] == "en"
    assert session.post("/settings", {"theme": "purple"}).status == 400


def test_static_assets_and_head(ui: Ui) -> None:
    css = ui.request("GET", "/static/ui.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")
    assert ui.request("GET", "/static/../app.py").status == 401
    assert ui.request("GET", "/static/missing.js").status == 401


def test_policy_form_error_shows_next_to_its_field(ui: Ui) -> None:
    session = ui.login()
    sent = session.post("/api/policy", {"ip_whitelist": "10.0.0.0/8\nnot-an-ip"}, accept_json=False)
    assert sent.status == 303 and sent.headers["location"] == "/api#policy"
    page = session.get("/api").text
    error = re.search(
        r'<p class="field-error" id="err-ip_whitelist" role="alert">([^<]+)</p>', page
    )
    assert error and "ip_whitelist" in error.group(1)
    assert page.index('id="p-allow"') < page.index('id="err-ip_whitelist"')
    assert 'id="err-' not in session.get("/api").text  # shown once


def test_daemon_exits_once_the_last_ui_session_ends(flm_home: Path) -> None:
    """The idle rule on a real daemon object, with its timers shortened: a live session keeps
    it up; logging out (no proxy left) lets it go."""
    import asyncio
    from urllib.parse import urlsplit

    from flm.core.paths import Paths
    from flm.daemon.main import Daemon

    async def scenario() -> None:
        daemon = Daemon(Paths.resolve())
        try:
            url = daemon.ui.login_url()
            redeemed = daemon.ui.sessions.redeem(urlsplit(url).query.split("=", 1)[1])
            assert redeemed is not None
            watcher = asyncio.ensure_future(daemon._exit_if_idle(grace_s=0.01, every_s=0.01))
            for _ in range(20):  # 20 idle checks pass with the session live
                await asyncio.sleep(0.01)
            assert not daemon.stop_event.is_set()
            assert daemon.ui.sessions.end(redeemed[0])
            await asyncio.wait_for(daemon.stop_event.wait(), 5)
            await watcher
        finally:
            daemon.ctx.close()

    asyncio.run(scenario())


def _key_row(key_id: str) -> Any:
    from flm.core.paths import Paths
    from flm.storage import Storage
    from flm.storage.security import ApiKeysRepo

    storage = Storage(Paths.resolve())
    try:
        return ApiKeysRepo(storage.security).get(key_id)
    finally:
        storage.close()


def test_key_scope_is_set_on_creation_and_changed_on_update(ui: Ui) -> None:
    session = ui.login()
    created = session.post(
        "/api/keys",
        {
            "label": "friend",
            "models": "flm://emu/*\nflm://other/tiny:1b",
            "rpm": "30",
            "burst": "5",
            "tpm": "2000",
            "daily_tokens": "10000",
            "daily_requests": "500",
            "expires": "30d",
            "read_only": "on",
        },
    )
    assert created.status == 200, created.text
    key_id = created.json["data"]["key"]["id"]  # type: ignore[index]
    row = _key_row(key_id)
    limits = row.limits
    assert limits.models == ["flm://emu/*", "flm://other/tiny:1b"]
    assert (limits.rpm, limits.burst, limits.tpm) == (30, 5, 2000)
    assert (limits.daily_tokens, limits.daily_requests, limits.read_only) == (10000, 500, True)
    assert limits.expires_at is not None and limits.expires_at > row.created_at
    # the list and the key's page show every setting
    listing = session.get("/api").text
    assert "flm://other/tiny:1b" in listing and "30 req/min (burst 5)" in listing
    assert "10000 tokens/day" in listing and "Read-only" in listing
    page = session.get(f"/api/key?id={key_id}")
    assert page.status == 200
    for text in ("2000 tokens/min", "500 requests/day", "Read-only", 'id="kf-tpm"'):
        assert text in page.text, text
    assert 'value="2000"' in page.text and "checked" in page.text
    # an update form shows every setting: what is emptied is lifted
    updated = session.post(
        "/api/keys/update",
        {"id": key_id, "models": "", "rpm": "60", "burst": "", "tpm": "", "expires": ""},
    )
    assert updated.status == 200, updated.text
    limits = _key_row(key_id).limits
    assert limits.models is None and limits.rpm == 60 and limits.burst is None
    assert limits.tpm is None and limits.daily_tokens is None and limits.expires_at is None
    assert limits.read_only is False
    assert "All models" in session.get(f"/api/key?id={key_id}").text


def test_key_form_errors_name_their_field(ui: Ui) -> None:
    session = ui.login()
    cases = {
        "expires": {"label": "a", "expires": "soon"},
        "burst": {"label": "a", "burst": "5"},
        "models": {"label": "a", "models": "http://elsewhere/model"},
        "rpm": {"label": "a", "rpm": "many"},
        "daily_tokens": {"label": "a", "daily_tokens": "-1"},
        "label": {"label": " "},
    }
    for field, form in cases.items():
        reply = session.post("/api/keys", form)
        assert reply.status == 400, (field, reply.text)
        assert reply.json["error"]["field"] == field, (field, reply.json)  # type: ignore[index]
    assert "data-key-id" not in session.get("/api").text  # nothing was created
    key_id = session.post("/api/keys", {"label": "b"}).json["data"]["key"]["id"]  # type: ignore[index]
    # a plain form post comes back to the key's page with the error next to its field
    back = session.post("/api/keys/update", {"id": key_id, "expires": "soon"}, accept_json=False)
    assert back.status == 303 and back.headers["location"] == f"/api/key?id={key_id}"
    page = session.get(f"/api/key?id={key_id}")
    assert 'id="err-expires"' in page.text and "--expires" in page.text
    assert _key_row(key_id).limits.expires_at is None
    assert session.get("/api/key?id=nosuchkey").status == 404
    revoked = session.post("/api/keys/revoke", {"id": key_id})
    assert revoked.status == 200
    again = session.post("/api/keys/update", {"id": key_id, "rpm": "5"})
    assert again.status == 400 and _key_row(key_id).limits.rpm is None


def test_dashboard_polls_share_one_read_per_few_seconds(ui: Ui) -> None:
    """An open dashboard polls; the audit window is read once per STATS_TTL_S however often
    it asks (a new request shows up after that, not on every poll)."""
    import time

    from flm.core.paths import Paths
    from flm.core.timeutil import now_iso
    from flm.storage import Storage
    from flm.storage.records import AUDIT_COLUMNS, write_batch
    from flm.ui.app import STATS_TTL_S

    session = ui.login()

    def requests() -> int:
        reply = session.get("/data/dashboard", Accept="application/json")
        summary = reply.json["fragments"]["summary"]  # type: ignore[index]
        return int(re.search(r'data-summary="requests">(\d+)<', summary)[1])  # type: ignore[index]

    def add_request() -> None:
        row = dict.fromkeys(AUDIT_COLUMNS) | {
            "ts": now_iso(),
            "request_id": "poll-test",
            "status": 200,
            "latency_ms": 5.0,
            "event_type": "request",
            "severity": "info",
        }
        storage = Storage(Paths.resolve())
        try:
            write_batch(storage.security, [tuple(row[c] for c in AUDIT_COLUMNS)], [], [], [])
        finally:
            storage.close()

    for _attempt in range(3):
        started = time.monotonic()
        before = requests()
        add_request()
        again = requests()
        if time.monotonic() - started < STATS_TTL_S:  # (else the cache expired: try again)
            break
    else:
        raise AssertionError("could not poll twice within the cache's lifetime")
    assert again == before  # the second poll did not read the audit window again
    deadline = time.monotonic() + STATS_TTL_S + 10
    while requests() == before:
        assert time.monotonic() < deadline, "the new request never showed up"
        time.sleep(0.2)
