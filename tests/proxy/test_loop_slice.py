"""The event loop thread's short time slice (see :func:`flm.core.threads.latency_slice`)."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from flm.core.threads import LOOP_SLICE_NS, latency_slice
from tests.support import foreground_proxy, free_port

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
    proc = foreground_proxy(port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        # (the loop runs on the main thread; the slice is asked for once the start is done,
        # which may be just after /health first answers)
        if _kernel_has_custom_slices():
            deadline = time.monotonic() + 10
            while _slice_of(proc.pid, proc.pid) != LOOP_SLICE_NS:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            helpers = []
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                if int(tid) != proc.pid:
                    try:
                        helpers.append(_slice_of(proc.pid, int(tid)))
                    except FileNotFoundError:  # (a thread that ended meanwhile)
                        continue
            assert helpers and all(s != LOOP_SLICE_NS for s in helpers)
        else:
            main_thread = _slice_of(proc.pid, proc.pid)
            assert main_thread is None or main_thread > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
