"""Helper threads that must not compete with the event loop for its CPU."""

from __future__ import annotations

import os
import sys
import threading

#: Niceness added to helper threads (audit flusher, database writers).
BACKGROUND_NICE = 5


def background_thread() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread; elsewhere nothing).

    A gateway pinned to one core runs its event loop and its helper threads on the same CPU;
    at equal priority the scheduler may run a helper's batch (formatting, SQLite inserts) for
    several milliseconds while a request waits. Niced, a helper yields the CPU as soon as the
    loop has work. Not more than +5: at +10 the helpers' share of a saturated core fell below
    what batched audit writes need, and the queue (memory) grew under sustained full load.
    """
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)
    except OSError:
        pass  # not permitted here: the thread simply keeps its priority
