"""Helper threads that must not compete with the event loop for its CPU."""

from __future__ import annotations

import ctypes
import os
import platform
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


def _probe_idle() -> bool:
    """Whether a thread of this process can enter the idle scheduling class and leave it
    again (leaving it needs CAP_SYS_NICE or an ``RLIMIT_NICE`` allowing the helpers' nice
    value; a container may deny either). Tried for real, in a thread made for the purpose:
    a thread that could not leave would stay there."""
    if sys.platform != "linux" or not hasattr(os, "SCHED_IDLE"):
        return False
    result: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(
                os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE
            )
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=probe, name="flm-idle-probe", daemon=True)
    thread.start()
    thread.join()
    return bool(result and result[0])


_may_idle: bool | None = None


def may_idle() -> bool:
    """:func:`_probe_idle`, once per process."""
    global _may_idle
    if _may_idle is None:
        _may_idle = _probe_idle()
    return _may_idle


class Idling:
    """A helper thread's scheduling class, switched between *idle* and normal.

    A helper at normal priority (even niced) that has the CPU keeps it for a while when a
    request arrives: the kernel lets a running task finish its time slice, and on a gateway
    pinned to one core that wait is the event loop's latency tail. A thread in the idle
    class (``SCHED_IDLE``) gives the CPU up at once to any other thread that wakes. But it
    runs only when the CPU has nothing else to do, so on a saturated core it would starve,
    and the audit with it; the thread is therefore idle only while the loop leaves CPU to
    spare, and put back at normal priority (:meth:`normal`, from any thread) once it falls
    behind.

    Only where the process may bring a thread back (:func:`may_idle`); elsewhere every call
    is a no-op and the helper keeps its normal (niced) priority."""

    def __init__(self) -> None:
        self.tid: int | None = None
        #: The thread is in the idle class now.
        self.idle = False
        #: How often it was put back at normal priority while idle (it fell behind).
        self.promotions = 0
        self._lock = threading.Lock()

    def bind(self) -> None:
        """Called by the helper thread itself, once, before it switches."""
        self.tid = threading.get_native_id()

    def enter(self) -> None:
        """(The helper) run in the idle class from now on."""
        if not self.idle and self.tid is not None and may_idle():
            self._switch(True)

    def leave(self) -> None:
        """(The helper) run at its normal priority again."""
        if self.idle:
            self._switch(False)

    def normal(self) -> None:
        """(Any thread) the helper fell behind: back to its normal priority."""
        if self.idle:
            self._switch(False, promoted=True)

    def _switch(self, idle: bool, *, promoted: bool = False) -> None:
        with self._lock:
            if self.idle == idle or self.tid is None:
                return
            policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
            try:
                os.sched_setscheduler(self.tid, policy, os.sched_param(0))
            except OSError:  # (the thread has ended, or the right was taken away)
                return
            self.idle = idle
            if promoted:
                self.promotions += 1


#: The event loop thread's time slice under Linux's EEVDF scheduler (the shortest the kernel
#: accepts): see :func:`latency_slice`.
LOOP_SLICE_NS = 100_000
#: ``SCHED_FLAG_RESET_ON_FORK``: threads and processes the loop thread starts later (executor
#: threads, engines) get the default slice, not the loop's (and a negative nice back to 0).
_RESET_ON_FORK = 0x01
#: ``sched_setattr``'s system call number by machine (no C library wraps it).
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


class _SchedAttr(ctypes.Structure):
    _fields_ = [  # (struct sched_attr, first version with the utilization clamps: 56 bytes)
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def latency_slice(ns: int = LOOP_SLICE_NS) -> bool:
    """Ask the kernel for a short time slice for the calling thread (Linux 6.12 and later:
    a normal thread's ``sched_runtime`` is its EEVDF slice; earlier kernels ignore it).

    Called by the event loop thread of a serving proxy. A thread with a shorter slice than
    the one running gets the CPU as soon as it wakes: a request arriving while a helper
    thread (the audit's formatting, the usage sums) runs on the gateway's core no longer
    waits for the helper's slice (1.4 ms by default here) to run out. Measured with
    ``bench/cpu_cost.py`` at c=1, in turns, in two sessions of 12 rounds: p99 −0.053 and
    −0.049 ms, CPU per request and c=64 unchanged. Needs no privilege (a thread may shorten
    its own slice); the thread keeps its policy and nice value, and what it starts later
    does not inherit the slice. False where it did not take (another system, another
    machine, a refusal)."""
    number = _SCHED_SETATTR.get(platform.machine())
    if sys.platform != "linux" or number is None:
        return False
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False  # (a real-time or idle thread: not ours to change)
        libc = ctypes.CDLL(None, use_errno=True)
        tid = threading.get_native_id()
        attr = _SchedAttr(
            size=ctypes.sizeof(_SchedAttr),
            sched_policy=os.SCHED_OTHER,
            sched_flags=_RESET_ON_FORK,
            sched_nice=os.getpriority(os.PRIO_PROCESS, tid),
            sched_runtime=ns,
        )
        return int(libc.syscall(number, 0, ctypes.byref(attr), 0)) == 0
    except (OSError, AttributeError):
        return False
