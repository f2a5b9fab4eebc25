"""Helper threads that must not compete with the event loop for its CPU."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

#: Niceness added to helper threads (in a gateway where the idle policy cannot be set, and
#: in every other process).
BACKGROUND_NICE = 5

_idle_helpers = False


def prefer_idle_helpers(on: bool = True) -> None:
    """This process serves a gateway: helper threads started from now on run under the idle
    scheduling policy (see :func:`background_thread`). Called first thing by the gateway's
    processes (the daemon, ``proxy start --no-daemon``, a worker), never by the CLI, whose
    few writes should not wait for a busy machine to go idle."""
    global _idle_helpers
    _idle_helpers = on


def background_thread() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread; elsewhere nothing): in a
    gateway process (:func:`prefer_idle_helpers`) the idle policy, ``SCHED_IDLE``, else (or
    where that is refused) +5 niceness.

    A gateway pinned to one core runs its event loop and its helper threads (audit flusher,
    database writer, usage rollups) on the same CPU. Niced +5, a helper inserting a batch of
    audit rows still kept the CPU for up to a scheduler slice after a request arrived: at c=1
    the p99 was 2.1 ms where the median was 0.23 ms, and with the helpers writing nothing it
    was 0.8 ms. Under the idle policy a request's wake-up preempts the helper at once (p99
    1.3 ms, medians of ten rounds, ``bench/cpu_cost.py``). A saturated loop then leaves the
    helpers only the idle policy's sliver of the CPU, which the audit's bound turns into
    back-pressure: the loop waits for the audit, the helpers run, and nothing grows (on a
    machine with a core to spare they run there).
    """
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    if _idle_helpers:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return
        except (OSError, AttributeError):
            pass
    with contextlib.suppress(OSError):  # (not permitted: the thread keeps its priority)
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)
