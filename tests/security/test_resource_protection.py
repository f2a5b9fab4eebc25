"""Resource protection looks at what FLM controls (issue 17, finding 3): its own event-loop
lag and memory, and requests in flight; the host's CPU and memory only when the policy asks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import pytest

from tests.security.conftest import Env

pytestmark = pytest.mark.slow  # (busy processes, and the monitor samples once a second)


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def busy_host() -> Iterator[None]:
    """Every CPU busy with other processes (as an engine generating on the same machine)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(psutil.cpu_count() or 1)
    ]
    try:
        _until("the host to be busy", lambda: psutil.cpu_percent(0.5) > 95)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_busy_host_does_not_make_flm_refuse(env: Env) -> None:
    env.policy({"resource_protection": {"enabled": True}})
    assert env.request("GET", "/v1/models")[0] == 200  # (starts the monitor)
    with busy_host():
        seen = env.rt.guard.samples
        _until("two samples of a busy host", lambda: env.rt.guard.samples >= seen + 2)
        codes = {env.request("GET", "/v1/models")[0] for _ in range(20)}
    assert codes == {200}


def test_host_thresholds_are_opt_in(env: Env) -> None:
    env.policy({"resource_protection": {"enabled": True, "cpu_threshold": 50}})
    assert env.request("GET", "/v1/models")[0] == 200
    with busy_host():
        _until("the monitor to see the busy host", lambda: env.rt.guard.overloaded)
        assert env.request("GET", "/v1/models")[0] == 503


def test_event_loop_lag_and_own_memory_refuse_new_requests(env: Env) -> None:
    env.policy({"resource_protection": {"enabled": True, "max_loop_lag_ms": 300}})
    assert env.request("GET", "/v1/models")[0] == 200
    seen = env.rt.guard.samples
    _until("a first sample", lambda: env.rt.guard.samples > seen)
    env.gw.call(lambda: time.sleep(1.5))  # the loop stalls: a lag well over 300 ms
    _until("the lag to be seen", lambda: env.rt.guard.overloaded)
    status, headers, _ = env.request("GET", "/v1/models")
    assert status == 503 and headers["retry-after"]
    _until("the lag to pass", lambda: not env.rt.guard.overloaded)
    assert env.request("GET", "/v1/models")[0] == 200
    env.policy({"resource_protection": {"enabled": True, "max_rss_mb": 1}})
    _until("the memory to be seen", lambda: env.rt.guard.overloaded)
    assert env.request("GET", "/v1/models")[0] == 503
    assert env.request("GET", "/health", key=None)[0] == 200
