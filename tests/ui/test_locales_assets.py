"""Words and weight: every visible string comes from the locale files, which agree on their
keys; the UI's own JavaScript and CSS stay small."""

from __future__ import annotations

import json
import re
import unicodedata
from importlib import resources
from pathlib import Path

UI = Path(str(resources.files("flm.ui")))
TEMPLATES = sorted((UI / "templates").glob("*.html"))
#: keys built at runtime (``t("status." ~ e.status)`` and the like) and the values they take
DYNAMIC = {
    "status.": ["RunningHealthy", "RunningDegraded", "ErrorNetwork", "ErrorApi", "InstalledOnly"],
    "nav.": ["dashboard", "api", "chat", "wizard", "security", "profiles", "settings"],
    "theme.": ["system", "light", "dark"],
    "lang.": ["en", "ja"],
    "chart.": ["requests", "latency", "refusals", "tokens", "keys", "engines"],
    "chart.no_data_": ["hour", "day"],
    "chart.scope_": ["key", "engine"],
    "sum.requests_": ["hour", "day"],
    "sum.refusals_": ["hour", "day"],
    "dash.charts_": ["hour", "day"],
    "fw.": ["ufw", "firewalld", "nftables", "pf", "powershell"],
    "security.tab_": ["audit", "intrusion", "anomaly"],
    "keys.status_": ["active", "revoked", "expired"],
    "wizard.step": ["1", "2", "3", "4"],
    "keys.f_": ["rpm", "burst", "tpm", "daily_requests", "daily_tokens"],
    "keys.usage_": ["hour", "day"],
}
KEY_CALL = re.compile(r"""\bt\(\s*["']([a-z0-9_.]+)["']\s*[,)~]""")


def _catalog(lang: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((UI / "locales" / f"{lang}.json").read_text("utf-8"))
    return data


def _used_keys(text: str) -> set[str]:
    keys: set[str] = set()
    for match in re.finditer(r"""\bt\(\s*["']([a-z0-9_.]+)["']\s*(~)?""", text):
        key = match.group(1)
        if match.group(2):
            keys.update(key + v for v in DYNAMIC[key])
        else:
            keys.add(key)
    return keys


def test_locale_key_sets_match() -> None:
    en, ja = _catalog("en"), _catalog("ja")
    assert set(en) == set(ja), set(en) ^ set(ja)
    for key in en:
        assert en[key].strip() and ja[key].strip(), key
        # the same placeholders on both sides
        assert set(re.findall(r"{(\w+)}", en[key])) == set(re.findall(r"{(\w+)}", ja[key])), key


def test_templates_and_code_use_only_known_keys() -> None:
    en = _catalog("en")
    used: set[str] = set()
    for path in [*TEMPLATES, UI / "app.py"]:
        used |= _used_keys(path.read_text("utf-8"))
    used |= set(re.findall(r'"((?:error|wizard)\.[a-z_]+)"', (UI / "app.py").read_text()))
    used -= {"error.html", "wizard.html"}
    missing = sorted(k for k in used if k not in en)
    assert not missing, missing
    js = (UI / "static" / "ui.js").read_text("utf-8")
    js_keys = set(re.findall(r"""\bt\("([a-z0-9_.]+)"\)""", js))
    assert js_keys and all(k.startswith("js.") for k in js_keys)
    assert not sorted(k for k in js_keys if k not in en)


def _visible_text(template: str) -> str:
    text = re.sub(r"{#.*?#}", " ", template, flags=re.S)
    text = re.sub(r"{%.*?%}", " ", text, flags=re.S)
    text = re.sub(r"{{.*?}}", " ", text, flags=re.S)
    text = re.sub(r"<script\b.*?</script>", " ", text, flags=re.S)
    text = re.sub(r"<(pre|code)\b[^>]*>\s*(flm ui|flm up)\s*</\1>", " ", text)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"&[a-z]+;|&#\d+;", " ", text)


ALLOWED_WORDS = {"flm", "ui", "up", "401", "429", "p50", "p95"}


def test_templates_hold_no_visible_text_of_their_own() -> None:
    for path in TEMPLATES:
        source = path.read_text("utf-8")
        words = [
            w
            for w in re.findall(r"\w+", _visible_text(source))
            if w.lower() not in ALLOWED_WORDS and not w.isdigit()
        ]
        assert not words, (path.name, words)
        for attr in re.findall(
            r"\b(?:title|aria-label|placeholder|alt|data-confirm)="
            r'"([^"]*)"',
            source,
        ):
            stripped = re.sub(r"{{.*?}}", "", attr)
            assert not any(unicodedata.category(c).startswith("L") for c in stripped), (
                path.name,
                attr,
            )


def test_the_visible_text_check_catches_a_stray_word() -> None:
    sample = '<p>{{ t("a.b") }} Hello</p><button title="Close">{{ t("x") }}</button>'
    assert re.findall(r"\w+", _visible_text(sample)) == ["Hello"]


def test_assets_stay_small() -> None:
    size = sum(p.stat().st_size for p in (UI / "static").iterdir())
    assert size < 100 * 1024, size
