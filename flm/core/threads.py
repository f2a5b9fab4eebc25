"""Helper threads that must not compete with the event loop for its CPU."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

#: Niceness added to helper threads where the idle policy cannot be set.
BACKGROUND_NICE = 5


def background_thread() -> None:
    """Let the calling thread run only when the event loop leaves the CPU free (Linux: per
    thread, ``SCHED_IDLE``; where that is refused, +5 niceness; elsewhere nothing).

    A gateway pinned to one core runs its event loop and its helper threads (audit flusher,
    database writer, usage rollups) on the same CPU. Niced +5, a helper inserting a batch of
    audit rows still kept the CPU for up to a scheduler slice after a request arrived: at c=1
    the p99 was 2.1 ms where the median was 0.23 ms, and with the helpers writing nothing it
    was 0.8 ms. Under the idle policy a request's wake-up preempts the helper at once (p99
    1.3 ms, medians of ten rounds, ``bench/cpu_cost.py``). A saturated loop then leaves the
    helpers no CPU of their own, which the audit's bound turns into back-pressure: the loop
    waits for the audit, the helpers run, and nothing grows (on a machine with a core to
    spare they run there).
    """
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (OSError, AttributeError):
        pass
    with contextlib.suppress(OSError):  # (not permitted: the thread keeps its priority)
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)
