"""The event loop thread's short time slice (see :func:`flm.core.threads.latency_slice`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from flm.core.threads import LOOP_SLICE_NS, latency_slice
from tests.support import free_port

LINUX = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")


def _kernel_has_custom_slices() -> bool:
    """Linux 6.12 and later take a normal thread's ``sched_runtime`` as its slice."""
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (6, 12)
    except (IndexError, ValueError):
        return False


def _slice_of(pid: int, tid: int) -> int | None:
    """The thread's EEVDF slice as ``/proc/PID/task/TID/sched`` shows it, in ns."""
    text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
    for line in text.splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1].strip())
    return None


@pytest.mark.skipif(not LINUX, reason="Linux on x86_64 or aarch64 only")
def test_a_thread_gets_the_short_slice_it_asks_for() -> None:
    got: list[object] = []

    def run() -> None:
        got.append(latency_slice())
        got.append(_slice_of(os.getpid(), threading.get_native_id()))
        got.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        child = threading.Thread(
            target=lambda: got.append(_slice_of(os.getpid(), threading.get_native_id()))
        )
        child.start()
        child.join()

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert got[0] is True
    assert got[2] == before  # (its nice value is kept)
    if _kernel_has_custom_slices():
        assert got[1] == LOOP_SLICE_NS
        assert got[3] != LOOP_SLICE_NS  # (a thread it starts is not short-sliced)


@pytest.mark.skipif(not LINUX, reason="Linux on x86_64 or aarch64 only")
def test_a_serving_proxy_runs_its_event_loop_on_the_short_slice(flm_home: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flm", "proxy", "start", "--no-daemon", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        main_thread = _slice_of(proc.pid, proc.pid)  # (the loop runs on the main thread)
        helpers = [
            _slice_of(proc.pid, int(tid))
            for tid in os.listdir(f"/proc/{proc.pid}/task")
            if int(tid) != proc.pid
        ]
        if _kernel_has_custom_slices():
            assert main_thread == LOOP_SLICE_NS
            assert helpers and all(s != LOOP_SLICE_NS for s in helpers)
        else:
            assert main_thread is None or main_thread > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
