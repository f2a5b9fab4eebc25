"""The garbage collector's view of a long-running server's heap."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect once and move every object alive now (modules, the app, compiled policies,
    caches built at start) out of the collector's reach.

    The cyclic collector's oldest generation is scanned whole now and then; in a gateway
    process that means every object imported or built at start, on each pass: 16-28 ms
    during which the event loop answers nothing, every few seconds under load. Frozen,
    those objects are still freed by reference counting when released, but no longer
    scanned: a full pass only walks what was made since.
    """
    gc.collect()
    gc.freeze()


def release_heap() -> None:
    """Give what :func:`settle_heap` froze back to the collector (a proxy stopped: its
    objects, frozen with the rest at its start, can then be freed; the next start freezes
    again)."""
    gc.unfreeze()
