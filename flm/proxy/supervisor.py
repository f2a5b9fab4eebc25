"""``flm proxy start --workers N``: the proxy process supervises N-1 sibling gateways.

The process that starts a proxy (the daemon, or ``--no-daemon``) is worker 0: it binds the
port(s) with ``SO_REUSEPORT`` and serves as before, and it alone does what must happen once
(the HTTP port's redirect and ACME challenges, certificate renewal, the daemon's retention and
admin API). It then starts workers 1..N-1 (``python -m flm.proxy.worker``), each serving the
gateway port with ``SO_REUSEPORT`` too; the kernel spreads new connections over all of them.

Each sibling talks to the supervisor over its stdin/stdout, one JSON object a line:

- supervisor → worker: the start message (the proxy's options, handle and databases), then
  ``{"cmd": "reload", "seq": n}`` (keys, policy, blocks, engines and the certificate changed:
  sent whenever worker 0 reloads, so a revoked key stops working on every worker before
  ``flm proxy reload`` or a key command returns) and ``{"cmd": "stop"}``;
- worker → supervisor: ``{"ready": ...}`` or ``{"error": ...}`` once, ``{"reloaded": n}``
  per reload, and ``{"stats": {"served": n}}`` when its request count changed.

A worker whose stdin closes stops: when the supervisor dies (even by ``kill -9``) its siblings
go with it and release the port. A worker that exits on its own (crash, ``kill -9``) is
noticed at once, audited (``proxy_worker_exited``) and started again after a back-off that
doubles from :data:`BACKOFF_INITIAL_S` to :data:`BACKOFF_MAX_S`; at most
:data:`MAX_RESTARTS_PER_MINUTE` restarts of one worker happen within a minute (then it waits for
the window, audited once as ``proxy_worker_restart_limit``). While a worker is down the others
keep serving: the kernel stops handing its (closed) socket new connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flm.core.errors import FlmError, ProxyError
from flm.services.audit_events import record_security_event

if TYPE_CHECKING:
    from flm.services.context import Context

log = logging.getLogger("flm.proxy")

EVENT_EXITED = "proxy_worker_exited"
EVENT_RESTARTED = "proxy_worker_restarted"
EVENT_RESTART_LIMIT = "proxy_worker_restart_limit"

#: A worker gets this long to say it serves (a TLS worker loads its certificate first).
READY_TIMEOUT_S = 60.0
#: How long a reload waits for each worker's acknowledgement.
RELOAD_TIMEOUT_S = 15.0
#: A stopping worker gets this long to finish its requests before it is killed.
STOP_TIMEOUT_S = 15.0
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 30.0
MAX_RESTARTS_PER_MINUTE = 5
#: A worker that served this long before it died starts again without back-off growth.
STABLE_AFTER_S = 60.0
#: The longest line a worker may send (its messages are small; more is a broken worker).
LINE_LIMIT = 64 * 1024


@dataclass
class WorkerSlot:
    """One sibling worker: its current process and its history."""

    index: int
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None
    started_at: float | None = None
    served: int = 0
    restarts: int = 0
    last_exit: str | None = None
    #: monotonic times of the restarts of the last minute
    recent: deque[float] = field(default_factory=deque)
    failures_in_a_row: int = 0
    limited: bool = False
    pending: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "alive": self.alive,
            "role": "worker",
            "served": self.served,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit,
        }


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown"
    return f"signal {-code}" if code < 0 else f"exit code {code}"


class WorkerGroup:
    """Workers 1..N-1 of one proxy (worker 0 is this process)."""

    def __init__(self, ctx: Context, handle_id: str, start_message: dict[str, Any], count: int):
        self.ctx = ctx
        self.handle_id = handle_id
        self.start_message = start_message
        self.slots = [WorkerSlot(i) for i in range(1, count)]
        self.stopping = False
        self._seq = 0
        self._log_level: str | None = None
        self._restarters: set[asyncio.Task[None]] = set()

    # --- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each serves; if one cannot, stop them all and
        raise its error (the proxy does not start half-way)."""
        results = await asyncio.gather(
            *(self._spawn(slot) for slot in self.slots), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            first = failed[0]
            if isinstance(first, FlmError):
                first.message = f"worker could not start: {first.message}"
                raise first
            raise ProxyError(f"worker could not start: {first}")

    async def _spawn(self, slot: WorkerSlot) -> None:
        """Start the slot's process and wait for its ``ready``; raises when it does not come.
        A reload sent while it started (it may have read the state before) is sent again."""
        reloads_before = self._seq
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flm.proxy.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
            close_fds=True,
            # (a terminal's Ctrl-C reaches the supervisor alone, which stops them in order)
            start_new_session=True,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            message = {**self.start_message, "index": slot.index}
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            await proc.stdin.drain()
            reply = await asyncio.wait_for(self._first_reply(proc.stdout), READY_TIMEOUT_S)
            if "ready" not in reply:
                error = reply.get("error") or {}
                raise FlmError(
                    str(error.get("message") or f"worker {slot.index} exited at start"),
                    code=str(error.get("code") or ProxyError.code),
                )
        except BaseException:
            await self._kill(proc)
            raise
        slot.process, slot.pid = proc, proc.pid
        slot.started_at = time.time()
        slot.served = 0
        self._track(slot, self._read(slot, proc))
        self._track(slot, self._watch(slot, proc))
        if self._seq != reloads_before:
            self._send(proc, {"cmd": "reload", "seq": 0, "log_level": self._log_level})

    @staticmethod
    async def _first_reply(stdout: asyncio.StreamReader) -> dict[str, Any]:
        """The worker's ``ready`` or ``error`` (empty: it exited first); other lines (a
        library that printed something) are skipped."""
        while True:
            line = await stdout.readline()
            if not line:
                return {}
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and ("ready" in reply or "error" in reply):
                return reply

    def _track(self, slot: WorkerSlot, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)

    async def _read(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.warning("worker %d sent an overlong line; stopping it", slot.index)
                await self._kill(proc)
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            stats = message.get("stats")
            if isinstance(stats, dict) and isinstance(stats.get("served"), int):
                slot.served = stats["served"]
            seq = message.get("reloaded")
            if isinstance(seq, int):
                waiter = slot.pending.pop(seq, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    # --- supervision -----------------------------------------------------------------------------

    async def _watch(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        for waiter in slot.pending.values():
            if not waiter.done():
                waiter.set_result(None)  # (a reload does not wait for a dead worker)
        slot.pending.clear()
        if self.stopping or slot.process is not proc:
            return
        slot.last_exit = _exit_text(code)
        served_s = time.time() - (slot.started_at or time.time())
        if served_s >= STABLE_AFTER_S:
            slot.failures_in_a_row = 0
        delay = self._delay(slot)
        log.error(
            "proxy worker %d (pid %s) ended (%s); restarting in %.2f s",
            slot.index,
            proc.pid,
            slot.last_exit,
            delay,
            extra={"handle": self.handle_id},
        )
        await self._event(
            EVENT_EXITED,
            "medium",
            {
                "handle": self.handle_id,
                "worker": slot.index,
                "pid": proc.pid,
                "exit": slot.last_exit,
                "served_s": round(served_s, 1),
                "restart_in_s": round(delay, 2),
            },
        )
        task = asyncio.ensure_future(self._restart(slot, proc.pid, delay))
        self._restarters.add(task)
        task.add_done_callback(self._restarters.discard)

    def _delay(self, slot: WorkerSlot) -> float:
        """The back-off before the next start of ``slot``: doubling per failure in a row, and
        never a sixth restart within a minute."""
        now = time.monotonic()
        while slot.recent and now - slot.recent[0] >= 60.0:
            slot.recent.popleft()
        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0**slot.failures_in_a_row)
        if len(slot.recent) >= MAX_RESTARTS_PER_MINUTE:
            delay = max(delay, 60.0 - (now - slot.recent[0]))
        return delay

    async def _restart(self, slot: WorkerSlot, previous_pid: int | None, delay: float) -> None:
        while not self.stopping:
            if len(slot.recent) >= MAX_RESTARTS_PER_MINUTE and not slot.limited:
                slot.limited = True
                await self._event(
                    EVENT_RESTART_LIMIT,
                    "high",
                    {
                        "handle": self.handle_id,
                        "worker": slot.index,
                        "restarts_last_minute": len(slot.recent),
                        "wait_s": round(delay, 1),
                    },
                )
            await asyncio.sleep(delay)
            if self._stopped():
                return
            slot.recent.append(time.monotonic())
            slot.failures_in_a_row += 1
            try:
                await self._spawn(slot)
            except Exception as exc:
                message = exc.message if isinstance(exc, FlmError) else str(exc)
                log.error("proxy worker %d did not start again: %s", slot.index, message)
                delay = self._delay(slot)
                continue
            slot.restarts += 1
            if len(slot.recent) < MAX_RESTARTS_PER_MINUTE:
                slot.limited = False
            await self._event(
                EVENT_RESTARTED,
                "info",
                {
                    "handle": self.handle_id,
                    "worker": slot.index,
                    "pid": slot.pid,
                    "previous_pid": previous_pid,
                    "restarts": slot.restarts,
                },
            )
            return

    async def _event(self, kind: str, severity: str, details: dict[str, Any]) -> None:
        try:
            storage = self.ctx.storage
            await asyncio.to_thread(record_security_event, storage, kind, severity, details)
        except Exception:  # (a full disk must not stop the supervision)
            log.exception("could not record %s", kind)

    def _stopped(self) -> bool:
        return self.stopping

    # --- commands --------------------------------------------------------------------------------

    def _send(self, proc: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        """Queue one command for a worker without waiting (the pipe takes small writes)."""
        if proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def reload(self, log_level: str | None = None) -> None:
        """Tell every live worker to reload; returns once each acknowledged (or timed out)."""
        if log_level:
            self._log_level = log_level
        self._seq += 1
        seq = self._seq
        command = json.dumps({"cmd": "reload", "seq": seq, "log_level": log_level}).encode()
        waiters = []
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.returncode is not None or proc.stdin is None:
                continue
            waiter = asyncio.get_running_loop().create_future()
            slot.pending[seq] = waiter
            try:
                proc.stdin.write(command + b"\n")
                await proc.stdin.drain()
            except (ConnectionError, RuntimeError):
                slot.pending.pop(seq, None)
                continue
            waiters.append(waiter)
        if waiters:
            _done, late = await asyncio.wait(waiters, timeout=RELOAD_TIMEOUT_S)
            if late:
                log.warning("%d proxy worker(s) did not confirm the reload in time", len(late))
            for slot in self.slots:
                slot.pending.pop(seq, None)

    async def stop(self) -> None:
        """Stop every worker (gracefully, then by force) and their supervision."""
        self.stopping = True
        for task in list(self._restarters):
            task.cancel()
        await asyncio.gather(*self._restarters, return_exceptions=True)
        procs = [s.process for s in self.slots if s.process is not None]
        for proc in procs:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    proc.stdin.write(b'{"cmd": "stop"}\n')
                    await proc.stdin.drain()
        if procs:
            await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_TIMEOUT_S
            )
        for proc in procs:
            await self._kill(proc)
        for slot in self.slots:
            for task in list(slot.tasks):
                task.cancel()
            await asyncio.gather(*slot.tasks, return_exceptions=True)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    def describe(self, served_here: int, started_at: float | None = None) -> list[dict[str, Any]]:
        """Every worker, this process (worker 0, the supervisor) first."""
        me = {
            "index": 0,
            "pid": os.getpid(),
            "alive": True,
            "role": "supervisor",
            "served": served_here,
            "restarts": 0,
            "started_at": started_at,
            "last_exit": None,
        }
        return [me, *(slot.describe() for slot in self.slots)]
