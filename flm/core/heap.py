"""The garbage collector's view of a long-running server's heap."""

from __future__ import annotations

import gc

#: The young generation's collection threshold while a proxy serves (CPython's default is
#: 700). A young collection runs once allocations outnumber deallocations by this much, and
#: it walks every young object alive. In a gateway at concurrency 64 the requests in flight
#: alone hold a few thousand objects (coroutines, futures, scopes): at 700 their coming and
#: going started a young collection every ~35 requests, each walking all of them again, about
#: 5 µs of CPU per request (`bench/cpu_cost.py`, c=64: 99.7 → 92.2 µs a request with 7,000).
#: Above the working set of the requests in flight, a collection runs every several
#: thousand requests; it walks more at once (a few ms, mostly the audit records waiting for
#: the writer, which the audit's bound caps). A request leaves no reference cycle, so the
#: threshold does not hold garbage back: it only decides how often live objects are walked.
YOUNG_THRESHOLD = 7000

#: Proxies serving in this process (a daemon may run several) and the thresholds found
#: before the first of them raised the young one.
_serving = 0
_found: tuple[int, int, int] | None = None


def settle_heap() -> None:
    """Collect once and move every object alive now (modules, the app, compiled policies,
    caches built at start) out of the collector's reach, and raise the young generation's
    threshold to :data:`YOUNG_THRESHOLD` while a proxy serves.

    The cyclic collector's oldest generation is scanned whole now and then; in a gateway
    process that means every object imported or built at start, on each pass: 16-28 ms
    during which the event loop answers nothing, every few seconds under load. Frozen,
    those objects are still freed by reference counting when released, but no longer
    scanned: a full pass only walks what was made since.
    """
    global _serving, _found
    gc.collect()
    gc.freeze()
    if _serving == 0:
        _found = gc.get_threshold()
        gc.set_threshold(max(YOUNG_THRESHOLD, _found[0]), _found[1], _found[2])
    _serving += 1


def release_heap() -> None:
    """Give what :func:`settle_heap` froze back to the collector (a proxy stopped: its
    objects, frozen with the rest at its start, can then be freed; the next start freezes
    again); once no proxy serves, the thresholds are the ones found before."""
    global _serving, _found
    gc.unfreeze()
    _serving = max(0, _serving - 1)
    if _serving == 0 and _found is not None:
        gc.set_threshold(*_found)
        _found = None
