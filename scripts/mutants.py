#!/usr/bin/env python3
"""Hand-made mutants of the security layer and the gateway, each a small realistic bug, and
the tests that must notice it.

    .venv/bin/python scripts/mutants.py            # every mutant
    .venv/bin/python scripts/mutants.py -k cors    # the mutants whose name holds "cors"
    .venv/bin/python scripts/mutants.py --list
    .venv/bin/python scripts/mutants.py --check   # does each mutant apply, do its tests exist?

Each mutant is one text replacement in one file (the original must occur exactly once, so a
mutant that no longer applies is reported, never silently skipped). It is applied to a copy of
the repository (the working tree is never touched), the mutant's tests run there with
``-x``, and the mutant is *killed* when they fail, *survived* when they pass. The score is
killed / all; the run exits 1 when it is below ``--min-score`` (default 90 %) or a mutant does
not apply.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutant
S = "tests/security/"
P = "tests/proxy/"

MUTANTS: tuple[Mutant, ...] = (
    # --- keys ----------------------------------------------------------------------------------
    M(
        "key-cache-by-id-alone",
        "flm/proxy/keys.py",
        "        hit = self._valid.get(digest)\n"
        "        if hit is not None and hmac.compare_digest(hit[0], digest):",
        "        hit = next((v for v in self._valid.values()\n"
        '                    if presented.startswith(f"flm_{v[1]}_")), None)\n'
        "        if hit is not None:",
        (S + "test_key_checks.py::test_a_wrong_secret_for_a_cached_key_is_refused",),
    ),
    M(
        "verify-per-address-unbounded",
        "flm/proxy/keys.py",
        "        if held >= self.per_address:",
        "        if held >= self.per_address * 1000:",
        (
            S + "test_key_checks.py::test_a_flood_of_wrong_secrets_from_one_address_is_refused_"
            "before_argon2",
        ),
    ),
    M(
        "verify-total-unbounded",
        "flm/proxy/keys.py",
        "        if self.admitted >= self.max_admitted:",
        "        if False:",
        (S + "test_key_checks.py::test_verifies_are_bounded_in_total",),
    ),
    M(
        "no-dummy-verify",
        "flm/proxy/keys.py",
        "                self._verify(self._dummy.result(), presented)",
        "                pass",
        (S + "test_key_checks.py::test_a_wrong_key_costs_the_same_whether_its_id_exists_or_not",),
    ),
    M(
        "negative-cache-cleared-on-reload",
        "flm/proxy/keys.py",
        "        for d in [d for d, kid in self._invalid.items() if kid is not None and kid in "
        "active_ids]:\n            del self._invalid[d]",
        "        self._invalid.clear()",
        (S + "test_key_checks.py::test_the_negative_cache_survives_a_reload",),
    ),
    M(
        "new-secret-on-stderr",
        "flm/cli/api_keys.py",
        '    data = {**key_view(row), "key": plaintext}',
        '    data = {**key_view(row), "key": plaintext}\n'
        '    print("secret:", plaintext.split("_", 2)[2], file=__import__("sys").stderr)',
        ("tests/cli/test_keys.py::test_create_shows_plaintext_once_and_stores_only_a_hash",),
    ),
    # --- guard ---------------------------------------------------------------------------------
    M(
        "honeypot-path-missing",
        "flm/proxy/guard.py",
        '"/wp-login.php", "/phpmyadmin", "/.env",',
        '"/wp-login.php", "/.env",',
        (S + "test_owner_lockout.py::test_every_honeypot_path_scores",),
    ),
    M(
        "loopback-not-exempt",
        "flm/proxy/guard.py",
        "    return policy.exempt_loopback and _loopback(ip)",
        "    return False",
        (S + "test_owner_lockout.py",),
    ),
    M(
        "first-block-one-failure-late",
        "flm/proxy/guard.py",
        "        if count == policy.max_failures:",
        "        if count == policy.max_failures + 1:",
        (S + "test_layers.py::test_auto_block_escalation_and_cost",),
    ),
    M(
        "token-bucket-half-tokens",
        "flm/proxy/guard.py",
        "            self.tokens -= 1\n",
        "            self.tokens -= 0.5\n",
        (S + "test_layers.py::test_allow_list_and_spoofed_forwarded_for",),
    ),
    M(
        "sqli-scores-less",
        "flm/proxy/guard.py",
        '        points += 60\n        reasons.append("sql_injection")',
        '        points += 6\n        reasons.append("sql_injection")',
        (S + "test_layers.py::test_intrusion_scoring_blocks",),
    ),
    # --- blocks per listener -------------------------------------------------------------------
    M(
        "blocks-always-shared",
        "flm/proxy/middleware/security.py",
        '        listener = "*" if rt.effective.shared_blocks else rt.settings.handle_id',
        '        listener = "*"',
        (S + "test_owner_lockout.py::test_a_block_applies_to_its_own_listener_unless_shared",),
    ),
    M(
        "blocks-loaded-from-every-listener",
        "flm/storage/records.py",
        "        if listener is not None:\n            sql += \" WHERE listener IN ('*', ?)\"",
        "        if False:\n            sql += \" WHERE listener IN ('*', ?)\"",
        (S + "test_owner_lockout.py::test_a_block_applies_to_its_own_listener_unless_shared",),
    ),
    # --- security middleware -------------------------------------------------------------------
    M(
        "untrusted-peer-forwarded-for",
        "flm/proxy/middleware/security.py",
        "        if policy.trusted_proxies and self._trusted(ip, policy.trusted_proxies):",
        "        if policy.trusted_proxies:",
        (
            S + "test_forwarded.py::test_an_untrusted_peer_cannot_use_forwarded_headers_when_"
            "proxies_are_trusted",
        ),
    ),
    M(
        "unparsable-hop-blames-proxy",
        "flm/proxy/middleware/security.py",
        "        if address is None:\n            return None",
        "        if address is None:\n            return peer",
        (S + "test_forwarded.py",),
    ),
    M(
        "x-real-ip-setting-ignored",
        "flm/proxy/middleware/security.py",
        '    if header == "x-real-ip":',
        "    if False:",
        (S + "test_forwarded.py",),
    ),
    M(
        "cors-any-origin",
        "flm/proxy/middleware/security.py",
        '    return origin if origin.decode("latin-1") in origins else None',
        "    return origin",
        (S + "test_layers.py::test_cors_preflight_without_key_and_headers",),
    ),
    M(
        "cors-star-by-default",
        "flm/proxy/middleware/security.py",
        "        return None  # no CORS unless the policy lists origins",
        '        return b"*"',
        (S + "test_layers.py::test_cors_preflight_without_key_and_headers",),
    ),
    M(
        "metrics-cors-readable",
        "flm/proxy/middleware/security.py",
        '                allowed = None if path == "/metrics" else _cors_origin(origin, policy)',
        "                allowed = _cors_origin(origin, policy)",
        (S + "test_layers.py::test_cors_preflight_without_key_and_headers",),
    ),
    M(
        "allow-list-skipped",
        "flm/proxy/middleware/security.py",
        "            if policy.whitelist and not self._allowed(ip, policy.whitelist):",
        "            if False:",
        (S + "test_layers.py::test_allow_list_and_spoofed_forwarded_for",),
    ),
    M(
        "two-authorization-headers-accepted",
        "flm/proxy/middleware/security.py",
        "        if len(values) > 1:",
        "        if len(values) > 2:",
        (S + "test_auth_matrix.py",),
    ),
    M(
        "keyed-clients-anomaly-blocked",
        "flm/proxy/middleware/security.py",
        "            and not self._known_key(headers)\n        ):",
        "        ):",
        (S + "test_anomaly_keys.py",),
    ),
    M(
        "no-fair-share-per-address",
        "flm/proxy/middleware/security.py",
        "            if guard.in_flight.get(who, 0) >= policy.max_connections_per_address:",
        "            if False:",
        (S + "test_fair_slots.py::test_one_address_cannot_take_every_slot",),
    ),
    M(
        "no-fair-share-per-key",
        "flm/proxy/middleware/security.py",
        '                    if guard.in_flight.get("key:" + key_id, 0) >= '
        "policy.max_connections_per_key:",
        "                    if False:",
        (S + "test_fair_slots.py::test_one_key_cannot_take_every_slot",),
    ),
    M(
        "host-cpu-threshold-by-default",
        "flm/core/policy.py",
        "            cpu_threshold=(\n"
        '                float(resource["cpu_threshold"]) if "cpu_threshold" in resource'
        " else None\n"
        "            ),",
        '            cpu_threshold=float(resource.get("cpu_threshold", 20)),',
        (S + "test_resource_protection.py::test_a_busy_host_does_not_make_flm_refuse",),
    ),
    M(
        "loop-lag-not-watched",
        "flm/proxy/middleware/security.py",
        "            over = bool(policy.max_loop_lag_ms and lag_ms > policy.max_loop_lag_ms)"
        " or bool(",
        "            over = bool(",
        (
            S + "test_resource_protection.py::test_event_loop_lag_and_own_memory_refuse_new_"
            "requests",
        ),
    ),
    # --- model ids, metrics, audit -------------------------------------------------------------
    M(
        "model-without-scheme",
        "flm/core/models.py",
        "    if not model_id.startswith(MODEL_SCHEME):\n        return None",
        "    if not model_id.startswith(MODEL_SCHEME):\n        model_id = MODEL_SCHEME + model_id",
        (S + "test_hostile_input.py::test_a_model_id_without_the_flm_scheme_is_refused",),
    ),
    M(
        "model-characters-unchecked",
        "flm/core/models.py",
        "    if not model_id.isprintable():",
        "    if False:",
        (S + "test_hostile_input.py",),
    ),
    M(
        "metrics-labels-unescaped",
        "flm/proxy/metrics.py",
        "    if len(value) <= MAX_LABEL and value.isprintable():",
        "    if True:",
        (S + "test_hostile_input.py::test_metrics_labels_are_bounded_and_escaped",),
    ),
    M(
        "audit-model-not-scrubbed",
        "flm/proxy/audit.py",
        "None if model is None else _scrub(model)[:512]",
        "None if model is None else model[:512]",
        (S + "test_audit.py::test_a_key_pasted_into_the_model_is_not_recorded",),
    ),
    # --- pass-through and request hygiene ------------------------------------------------------
    M(
        "cookie-forwarded",
        "flm/proxy/routes/passthrough.py",
        '        b"cookie",\n        b"x-forwarded-for",',
        '        b"x-forwarded-for",',
        (P + "test_request_hygiene.py",),
    ),
    M(
        "set-cookie-returned",
        "flm/proxy/routes/passthrough.py",
        '        b"content-length",\n        b"set-cookie",\n        b"server",',
        '        b"content-length",\n        b"server",',
        (P + "test_request_hygiene.py",),
    ),
    M(
        "override-headers-forwarded",
        "flm/proxy/routes/passthrough.py",
        '        b"x-http-method-override",\n        b"x-http-method",\n'
        '        b"x-method-override",\n        b"x-original-url",\n        b"x-rewrite-url",\n'
        "    }\n)",
        "    }\n)",
        (P + "test_request_hygiene.py",),
    ),
    M(
        "underscore-names-forwarded",
        "flm/proxy/routes/passthrough.py",
        '            or (not underscores and b"_" in low)\n        ):',
        "            or False\n        ):",
        (P + "test_request_hygiene.py",),
    ),
    M(
        "pass-through-error-details",
        "flm/proxy/routes/passthrough.py",
        "    except EngineError:\n        # (one text for every way",
        "    except EngineError as exc:\n        raise HttpError.from_flm(exc) from exc\n"
        "    except ZeroDivisionError:\n        # (one text for every way",
        (P + "test_request_hygiene.py::test_pass_through_failures_read_alike_whatever_listens",),
    ),
    M(
        "trailers-merged",
        "flm/http/server.py",
        "        if not self.in_head:\n            return  # a chunked body's trailer fields",
        "        if False:\n            return  # a chunked body's trailer fields",
        (P + "test_request_hygiene.py",),
    ),
    M(
        "deep-json-500",
        "flm/proxy/asgi.py",
        "    except RecursionError:",
        "    except ZeroDivisionError:",
        (P + "test_request_hygiene.py::test_json_nested_deeper_than_the_parser_goes_is_a_400",),
    ),
    M(
        "ssrf-nat64",
        "flm/proxy/images.py",
        "    if address in _NAT64 or address in _COMPATIBLE:",
        "    if address in _COMPATIBLE:",
        (P + "test_images.py",),
    ),
    M(
        "ssrf-6to4",
        "flm/proxy/images.py",
        "    if address.sixtofour is not None:",
        "    if False:",
        (P + "test_images.py",),
    ),
    # --- connections and storage ---------------------------------------------------------------
    M(
        "no-per-address-connection-cap",
        "flm/http/server.py",
        "            if self.per_address and self.by_address.get(who, 0) >= self.per_address:",
        "            if False:",
        (P + "test_connection_caps.py",),
    ),
    M(
        "default-listen-backlog",
        "flm/http/server.py",
        "            backlog=LISTEN_BACKLOG,",
        "",
        (P + "test_connection_caps.py::test_the_listen_backlog_is_honoured",),
    ),
    M(
        "migrations-deferred-begin",
        "flm/storage/db.py",
        '                conn.execute("BEGIN IMMEDIATE")\n                break',
        '                conn.execute("BEGIN")\n                break',
        ("tests/storage/test_concurrent_open.py",),
    ),
)


def _copy(into: Path) -> None:
    for name in ("flm", "tests", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, into / name)


def problems(mutant: Mutant) -> list[str]:
    """Why a mutant cannot run as written: its text is not found exactly once, or a test it
    names does not exist (both happen when the source is edited or reformatted)."""
    found: list[str] = []
    count = (ROOT / mutant.path).read_text().count(mutant.old)
    if count != 1:
        found.append(f"its original text occurs {count} times in {mutant.path}")
    for test in mutant.tests:
        file, _, node = test.partition("::")
        if not (ROOT / file).exists():
            found.append(f"no test path {file}")
        elif node and f"def {node.split('::')[-1].split('[')[0]}(" not in (ROOT / file).read_text():
            found.append(f"no test {test}")
    return found


def run(mutant: Mutant, timeout: float) -> tuple[str, float]:
    """'killed', 'survived' or 'does not apply', and the seconds it took."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flm-mutant-") as tmp:
        work = Path(tmp)
        _copy(work)
        target = work / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            return "does not apply", time.monotonic() - started
        target.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        try:
            done = subprocess.run(
                cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "killed", time.monotonic() - started  # (the tests hung on it: noticed)
        return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name holds this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument(
        "--check", action="store_true", help="report mutants that do not apply, run no test"
    )
    parser.add_argument("--min-score", type=float, default=90.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.path}")
        return 0
    if args.check:
        broken = 0
        for m in chosen:
            for problem in problems(m):
                broken += 1
                print(f"{m.name}: {problem}")
        print(f"{len(chosen)} mutants, {broken} problems")
        return 1 if broken else 0
    results: dict[str, list[str]] = {"killed": [], "survived": [], "does not apply": []}
    for n, mutant in enumerate(chosen, 1):
        outcome, seconds = run(mutant, args.timeout)
        results[outcome].append(mutant.name)
        print(f"[{n}/{len(chosen)}] {outcome:14} {mutant.name} ({seconds:.0f} s)", flush=True)
    applied = len(results["killed"]) + len(results["survived"])
    score = 100.0 * len(results["killed"]) / applied if applied else 0.0
    print(f"\nscore: {len(results['killed'])}/{applied} killed ({score:.1f} %)")
    for outcome in ("survived", "does not apply"):
        if results[outcome]:
            print(f"{outcome}: {', '.join(results[outcome])}")
    return 0 if score >= args.min_score and not results["does not apply"] else 1


if __name__ == "__main__":
    sys.exit(main())
