"""Helper threads that must not compete with the event loop for its CPU."""

from __future__ import annotations

import os
import sys
import threading
import time

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


#: A helper's pause: long enough that the event loop, if it waits for the GIL or the CPU,
#: gets them.
PAUSE_S = 0.0001
#: A pause that took this long got the GIL (or a CPU) back only when a switch was forced:
#: the loop, or the machine, is saturated, and further pauses would only slow the helper.
BUSY_PAUSE_S = 0.8 * sys.getswitchinterval()


def pause() -> bool:
    """Give the GIL and the CPU to other threads for a moment, between two slices of a
    helper's work (a helper that holds them for milliseconds shows as the event loop's
    latency tail). False when the pause found the process or the machine saturated: the
    caller then does the rest of its work without pauses."""
    paused = time.perf_counter()
    time.sleep(PAUSE_S)
    return time.perf_counter() - paused < BUSY_PAUSE_S
