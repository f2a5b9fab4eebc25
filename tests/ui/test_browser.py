"""The web UI in headless Debian Chromium, driven by Playwright (never `playwright install`):
the acceptance flow, both languages and themes, contrast, labels, keyboard use, and no request
leaving loopback. Screenshots of every page go to tests/ui/screenshots/ (git-ignored)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import free_port
from tests.ui.conftest import Ui

SHOTS = Path(__file__).parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGES = {
    "dashboard": "/",
    "api": "/api",
    "chat": "/chat",
    "wizard-1": "/wizard?step=1",
    "wizard-2": "/wizard?step=2",
    "wizard-3": "/wizard?step=3",
    "wizard-4": "/wizard?step=4&mode=dev-selfsigned&port=8080&bind=0.0.0.0",
    "security": "/security",
    "profiles": "/profiles",
    "settings": "/settings",
}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

#: WCAG 2 contrast of every visible text node, computed in the page
CONTRAST_JS = (Path(__file__).parent / "contrast.js").read_text()

LABELS_JS = """
() => {
  const bad = [];
  document.querySelectorAll("input, select, textarea, button").forEach((el) => {
    if (el.type === "hidden") return;
    const named = (el.labels && el.labels.length) || el.getAttribute("aria-label") ||
      el.getAttribute("aria-labelledby") || (el.tagName === "BUTTON" && el.textContent.trim());
    if (!named) bad.push(el.outerHTML.slice(0, 80));
  });
  return bad;
}
"""


def _chromium() -> str:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI (scripts/system-packages.txt)")
        pytest.skip("Debian package chromium is not installed")
    return CHROMIUM


@pytest.fixture
def browser() -> Iterator[Any]:
    path = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Watch:
    """Every URL the page asked for, and every CSP report in the console."""

    def __init__(self, page: Any) -> None:
        self.urls: list[str] = []
        self.csp: list[str] = []
        page.on("request", lambda r: self.urls.append(r.url))
        page.on(
            "console",
            lambda m: self.csp.append(m.text) if "Content Security Policy" in m.text else None,
        )

    def assert_loopback_only(self) -> None:
        assert self.urls
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme in ("data", "about", "blob"):
                continue
            assert parts.hostname in LOOPBACK or f"[{parts.hostname}]" in LOOPBACK, url
        assert not self.csp, self.csp


def _until(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _chart_sum(page: Any, kind: str) -> float:
    values = page.eval_on_selector_all(
        f'svg[data-chart="{kind}"] [data-value]', "els => els.map(e => Number(e.dataset.value))"
    )
    return float(sum(values))


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_acceptance_flow(ui: Ui, emulator: str, browser: Any) -> None:
    page = browser.new_page()
    watch = Watch(page)
    page.on("dialog", lambda d: d.accept())
    page.goto(ui.login_url)
    assert urlsplit(page.url).path == "/" and "token" not in page.url
    # the emulator engine is healthy on the dashboard
    page.wait_for_selector('[data-engine="emu"] [data-status="RunningHealthy"]')
    # start a proxy from the dashboard
    port = free_port()
    page.fill("#start-port", str(port))
    page.click("form[action='/proxies/start'] button")
    page.wait_for_selector(f"[data-fragment=proxies] >> text=http://localhost:{port}/v1")
    # create a key: the plaintext is shown once, then gone
    page.goto(ui.origin + "/api")
    page.fill("#key-label", "browser")
    page.click("#key-create")
    page.wait_for_selector("#key-dialog[open]")
    plaintext = page.inner_text("#key-plaintext").strip()
    assert plaintext.startswith("flm_")
    assert plaintext in page.inner_text("#key-curl")
    with page.expect_navigation():
        page.click("#key-dialog-close")
    assert plaintext not in page.content()
    assert page.inner_text("#key-plaintext") == ""
    key_id = page.get_attribute("tr[data-key-status=active]", "data-key-id")
    # chat streams through the proxy with that key
    page.goto(ui.origin + "/chat")
    page.select_option("#chat-model", "flm://emu/tiny:1b")
    page.fill("#chat-key", plaintext)
    page.evaluate("""() => { window.__frames = 0; new MutationObserver(() => window.__frames++)
        .observe(document.getElementById('chat-output'), {childList: true, characterData: true,
                                                         subtree: true}); }""")
    page.click("#chat-send")
    page.wait_for_selector("#chat-output[data-done='1']")
    assert "Hello from the emulator" in page.inner_text("#chat-output")
    assert page.evaluate("window.__frames") >= 2  # it arrived in pieces
    assert page.inner_text('[data-meta="status"]') == "200"
    assert page.inner_text('[data-meta="request_id"]').strip()
    assert page.inner_text('[data-meta="ttft"]').endswith("ms")
    _shot(page, "flow-chat-streamed")
    # two models side by side on one prompt
    page.select_option("#chat-model-2", "flm://emu/small:3b")
    page.click("#chat-send")
    page.wait_for_selector("#chat-output[data-done='1']")
    page.wait_for_selector("#chat-output-2[data-done='1']")
    assert "Hello from the emulator" in page.inner_text("#chat-output-2")
    assert page.inner_text("[data-pane='2'] .pane-model") == "flm://emu/small:3b"
    _shot(page, "flow-chat-compare")
    page.select_option("#chat-model-2", "")
    # revoke it; the chat now fails with a visible error and request id
    page.goto(ui.origin + "/api")
    with page.expect_navigation():
        page.click(f"tr[data-key-id='{key_id}'] form[action='/api/keys/revoke'] button")
    assert page.get_attribute(f"tr[data-key-id='{key_id}']", "data-key-status") == "revoked"
    page.goto(ui.origin + "/chat")
    page.select_option("#chat-model", "flm://emu/tiny:1b")
    page.fill("#chat-key", plaintext)
    page.click("#chat-send")
    page.wait_for_selector("#chat-error:not([hidden])")
    assert page.inner_text('[data-meta="status"]') == "401", page.inner_text("#chat-error")
    assert page.inner_text("#chat-error .msg").strip()
    assert page.inner_text("#chat-error code").strip()
    _shot(page, "flow-chat-refused")
    # the charts show those requests (audit rows are written off the request path)
    page.goto(ui.origin + "/")

    def charted() -> bool:
        page.reload()
        return _chart_sum(page, "requests") >= 2 and _chart_sum(page, "refusals") >= 1

    _until(charted, "the charts to show the chat requests")
    _shot(page, "flow-dashboard-charts")
    watch.assert_loopback_only()


def test_every_page_in_both_languages_and_themes(ui: Ui, emulator: str, browser: Any) -> None:
    page = browser.new_page()
    watch = Watch(page)
    page.on("dialog", lambda d: d.accept())
    page.goto(ui.login_url)
    # something to show: a running proxy and two keys, one of them revoked
    page.fill("#start-port", str(free_port()))
    page.click("form[action='/proxies/start'] button")
    page.wait_for_selector("[data-fragment=proxies] code")
    page.goto(ui.origin + "/api")
    for label in ("laptop", "ci-runner"):
        page.fill("#key-label", label)
        page.click("#key-create")
        page.wait_for_selector("#key-dialog[open]")
        if label == "laptop":
            _shot(page, "api-key-dialog")
        with page.expect_navigation():
            page.click("#key-dialog-close")
    with page.expect_navigation():
        page.click("tr[data-key-status=active] form[action='/api/keys/revoke'] button")
    # the keys table sorts by a column, both ways
    page.click("#keys-table thead th:first-child button.sort")
    labels = page.eval_on_selector_all(
        "#keys-table tbody tr td:first-child", "els => els.map(e => e.textContent.trim())"
    )
    assert labels == sorted(labels)
    page.click("#keys-table thead th:first-child button.sort")
    assert (
        page.eval_on_selector_all(
            "#keys-table tbody tr td:first-child", "els => els.map(e => e.textContent.trim())"
        )
        == labels[::-1]
    )
    # the key page (the active key, with a scope) and one engine's view join the tour
    active = page.get_attribute("tr[data-key-status=active]", "data-key-id")
    page.goto(ui.origin + f"/api/key?id={active}")
    page.fill("#kf-models", "flm://emu/*")
    page.fill("#kf-daily_tokens", "5000")
    with page.expect_navigation():
        page.click("#key-save")
    pages = {**PAGES, "key": f"/api/key?id={active}", "dashboard-engine": "/?engine=emu"}
    seen: dict[str, list[str]] = {}
    for lang in ("en", "ja"):
        for theme in ("light", "dark"):
            page.goto(ui.origin + "/settings")
            page.select_option("#s-lang", lang)
            page.select_option("#s-theme", theme)
            with page.expect_navigation():
                page.click("main form[action='/settings'] button[type=submit]")
            assert page.get_attribute("html", "lang") == lang
            assert page.get_attribute("html", "data-theme") == theme
            for name, path in pages.items():
                page.goto(ui.origin + path)
                _shot(page, f"{name}-{lang}-{theme}")
                result = page.evaluate(CONTRAST_JS)
                assert result["checked"] > 5, name
                assert not result["bad"], (name, lang, theme, result["bad"])
                assert not page.evaluate(LABELS_JS), (name, page.evaluate(LABELS_JS))
            seen[lang] = page.eval_on_selector_all(
                "nav#nav a, h1, main button, label", "els => els.map(e => e.textContent.trim())"
            )
    # a narrow window folds the navigation into a menu
    page.set_viewport_size({"width": 600, "height": 900})
    page.goto(ui.origin + "/")
    assert not page.is_visible("nav#nav a[href='/api']")
    page.click(".menu-toggle")
    assert page.is_visible("nav#nav a[href='/api']")
    _shot(page, "dashboard-narrow-menu")
    # switching the language changes every label
    assert len(seen["en"]) == len(seen["ja"])
    same = [a for a, b in zip(seen["en"], seen["ja"], strict=True) if a == b]
    assert not same, same
    watch.assert_loopback_only()


def test_theme_follows_the_os_until_chosen(ui: Ui, browser: Any) -> None:
    background = "getComputedStyle(document.body).backgroundColor"
    for scheme, expected in (("dark", "rgb(18, 20, 23)"), ("light", "rgb(255, 255, 255)")):
        context = browser.new_context(color_scheme=scheme)
        page = context.new_page()
        page.goto(ui.new_login_url())
        assert page.get_attribute("html", "data-theme") == "system"
        assert page.evaluate(background) == expected, scheme
        context.close()


def test_first_visit_follows_accept_language(ui: Ui, browser: Any) -> None:
    context = browser.new_context(
        locale="ja-JP", extra_http_headers={"Accept-Language": "ja-JP,ja;q=0.9,en;q=0.5"}
    )
    page = context.new_page()
    page.goto(ui.login_url)
    assert page.get_attribute("html", "lang") == "ja"
    assert page.inner_text("nav#nav a[aria-current=page]") == "ダッシュボード"


def test_key_creation_with_the_keyboard_alone(ui: Ui, browser: Any) -> None:
    page = browser.new_page()
    page.goto(ui.login_url)
    page.goto(ui.origin + "/api")
    for _ in range(80):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "key-label":
            break
    else:
        raise AssertionError("the key label field is not reachable with Tab")
    page.keyboard.type("keyboard")
    page.keyboard.press("Enter")
    page.wait_for_selector("#key-dialog[open]")
    assert page.inner_text("#key-plaintext").startswith("flm_")
    # focus is inside the dialog; Tab reaches its close button, Enter closes it
    assert page.evaluate("document.getElementById('key-dialog').contains(document.activeElement)")
    for _ in range(10):
        if page.evaluate("document.activeElement.id") == "key-dialog-close":
            break
        page.keyboard.press("Tab")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.inner_text("#keys-table").count("keyboard") == 1


def _chat(page: Any, ui: Ui, key: str, model: str) -> str:
    """Send one chat from the tester; the status it shows once done or refused."""
    page.goto(ui.origin + "/chat")
    page.select_option("#chat-model", model)
    page.fill("#chat-key", key)
    page.click("#chat-send")
    page.wait_for_selector("#chat-output[data-done='1'], #chat-error:not([hidden])")
    return str(page.inner_text('[data-meta="status"]'))


def test_key_scope_page_and_usage_charts(ui: Ui, emulator: str, browser: Any) -> None:
    page = browser.new_page()
    watch = Watch(page)
    page.on("dialog", lambda d: d.accept())
    page.goto(ui.login_url)
    page.fill("#start-port", str(free_port()))
    page.click("form[action='/proxies/start'] button")
    page.wait_for_selector("[data-fragment=proxies] code")
    # create a key limited to one model, with limits and an expiry
    page.goto(ui.origin + "/api")
    page.fill("#key-label", "scoped")
    page.click("#key-scope summary")
    page.fill("#kf-models", "flm://emu/tiny:1b")
    page.fill("#kf-rpm", "30")
    page.fill("#kf-burst", "5")
    page.fill("#kf-daily_tokens", "100000")
    page.fill("#kf-expires", "30d")
    _shot(page, "api-key-scope-form")
    page.click("#key-create")
    page.wait_for_selector("#key-dialog[open]")
    plaintext = page.inner_text("#key-plaintext").strip()
    with page.expect_navigation():
        page.click("#key-dialog-close")
    row = "tr[data-key-status=active]"
    assert page.inner_text(f"{row} [data-cell=models]").strip() == "flm://emu/tiny:1b"
    assert "30 req/min (burst 5)" in page.inner_text(f"{row} [data-cell=limits]")
    assert "100000 tokens/day" in page.inner_text(f"{row} [data-cell=limits]")
    # the scope holds at the gateway: the other model is refused
    assert _chat(page, ui, plaintext, "flm://emu/tiny:1b") == "200"
    assert _chat(page, ui, plaintext, "flm://emu/small:3b") == "403"
    assert "small:3b" in page.inner_text("#chat-error .msg")
    # the key's page shows its settings and changes them
    page.goto(ui.origin + "/api")
    with page.expect_navigation():
        page.click(f"{row} td:first-child a")
    assert urlsplit(page.url).path == "/api/key"
    assert page.inner_text("[data-setting=models]").strip() == "flm://emu/tiny:1b"
    assert page.input_value("#kf-rpm") == "30"
    page.fill("#kf-models", "")
    page.check("#kf-read_only")
    with page.expect_navigation():
        page.click("#key-save")
    assert page.inner_text(".flash.ok").strip()
    assert page.inner_text("[data-setting=models]").strip() == "All models"
    assert page.inner_text("[data-setting=read_only]").strip() == "Read-only"
    key_page = page.url
    # at once in the running proxy: a read-only key may not chat
    assert _chat(page, ui, plaintext, "flm://emu/small:3b") == "403"
    assert "list models" in page.inner_text("#chat-error .msg")
    # its charts: its requests, refusals and tokens (written off the request path)

    def charted() -> bool:
        page.goto(key_page)
        return (
            _chart_sum(page, "requests") >= 3
            and _chart_sum(page, "refusals") >= 2
            and _chart_sum(page, "tokens") > 0
        )

    _until(charted, "the key's charts to show its requests")
    assert page.query_selector('svg[data-chart="keys"]') is None  # one key: no ranking
    assert page.inner_text("[data-scope]").startswith('Showing API key "scoped" only')
    _shot(page, "api-key-page")
    with page.expect_navigation():
        page.click("nav.range a[href*='range=day']")
    assert page.get_attribute("nav.range a[aria-current]", "href").endswith("range=day")
    assert _chart_sum(page, "requests") >= 3
    # the dashboard narrows to the engine from its table, and back to all traffic
    page.goto(ui.origin + "/")
    with page.expect_navigation():
        page.click("[data-engine-charts=emu]")
    assert page.get_attribute("[data-scope]", "data-scope") == "engine:emu"
    # the served chat and the model refusal reached the engine's route; the read-only
    # refusal came before any engine was chosen
    assert _chart_sum(page, "requests") == 2
    assert page.query_selector('svg[data-chart="engines"]') is None
    assert "/data/dashboard?range=hour&engine=emu" in page.get_attribute("[data-poll]", "data-poll")
    with page.expect_navigation():
        page.click("[data-scope] a")
    assert page.query_selector("[data-scope]") is None
    watch.assert_loopback_only()


def _column(page: Any, table: str, n: int) -> list[str]:
    return list(
        page.eval_on_selector_all(
            f"#{table} tbody tr td:nth-child({n})",
            "els => els.map(e => e.dataset.sort !== undefined ? e.dataset.sort "
            ": e.textContent.trim())",
        )
    )


def _sorts(page: Any, table: str, n: int = 1) -> None:
    """Clicking column ``n``'s header sorts the rows by it, again reverses them."""
    before = _column(page, table, n)
    assert len(set(before)) >= 2, (table, before)
    page.click(f"#{table} thead th:nth-child({n}) button.sort")
    after = _column(page, table, n)
    assert after == sorted(before, key=lambda v: v.casefold()) or after == sorted(before), after
    assert page.get_attribute(f"#{table} thead th:nth-child({n})", "aria-sort") == "ascending"
    page.click(f"#{table} thead th:nth-child({n}) button.sort")
    assert _column(page, table, n) == after[::-1], table


def test_every_list_sorts(ui: Ui, emulator: str, browser: Any) -> None:
    from flm.core.paths import Paths
    from flm.core.timeutil import now_iso
    from flm.storage import Storage
    from flm.storage.records import write_batch
    from tests.conftest import flm_subprocess

    # two engines, two proxies, two profiles and prompts, two blocked addresses
    other = emulator.replace("127.0.0.1", "localhost")  # the same emulator, a second entry
    added = flm_subprocess("engines", "add", "--kind", "ollama", "--url", other, "--id", "alt")
    assert added.returncode == 0, added.stderr
    storage = Storage(Paths.resolve())
    write_batch(
        storage.security,
        [],
        [
            ("198.51.100.7", "", "honeypot", 1, now_iso(), None, 1),
            ("192.0.2.9", "", "auth failures", 5, now_iso(), None, 1),
        ],
        [],
        [],
    )
    storage.close()
    page = browser.new_page()
    page.on("dialog", lambda d: d.accept())
    page.goto(ui.login_url)
    for _ in range(2):
        page.fill("#start-port", str(free_port()))
        with page.expect_response(lambda r: r.url.endswith("/proxies/start")):
            page.click("form[action='/proxies/start'] button")
    session = ui.login()
    for engine, label in (("zeta", "zz-profile"), ("alpha", "aa-profile")):
        saved = session.post(
            "/profiles/save",
            {"engine_id": engine, "model_id": "m", "label": label, "parameters": '{"top_p": 1}'},
        )
        assert saved.status == 200, saved.text
    for api in ("responses", "chat_completions"):
        assert session.post("/prompts/save", {"api_id": api, "template": "Be brief."}).status == 200
    page.goto(ui.origin + "/")
    page.wait_for_selector("#proxies-table tbody tr:nth-child(2)")
    page.wait_for_selector("[data-engine=alt]")
    _sorts(page, "engines-table")
    order = _column(page, "engines-table", 1)
    # the dashboard's poll redraws the table; the order chosen stays
    polled = int(page.get_attribute("[data-poll]", "data-polled") or 0)
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    _until(
        lambda: int(page.get_attribute("[data-poll]", "data-polled") or 0) > polled,
        "a dashboard poll",
    )
    assert _column(page, "engines-table", 1) == order
    assert page.get_attribute("#engines-table thead th:first-child", "aria-sort") == "descending"
    _sorts(page, "proxies-table")
    page.goto(ui.origin + "/api")
    _sorts(page, "models-table")
    page.goto(ui.origin + "/profiles")
    _sorts(page, "profiles-table", 3)
    _sorts(page, "prompts-table")
    page.goto(ui.origin + "/security")
    _sorts(page, "blocklist-table")
