"""`reconcile_loop`: the level-triggered loop every emulator controller runs.

A store event on a watched resource wakes it (so does `interval` without one); a short pause lets a
burst of events settle into one reconcile; `reconcile_all` looks at the whole state and makes it
right. A failing reconcile is logged and retried on the next wake, never ends the loop.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from .store import Store

log = logging.getLogger(__name__)


async def reconcile_loop(store: Store, watched: Collection[tuple[str, str]], interval: float,
                         reconcile_all: Callable[[], None], name: str) -> None:
    """Run `reconcile_all` whenever a (group, plural) in `watched` changes; until cancelled."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    unsubscribe = store.add_listener(
        lambda ev: loop.call_soon_threadsafe(wake.set) if ev.key in watched else None)
    try:
        while True:
            try:
                await asyncio.wait_for(wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            await asyncio.sleep(0.02)  # let a burst of events settle into one reconcile
            try:
                reconcile_all()
            except Exception:
                log.exception("%s reconcile failed", name)
    finally:
        unsubscribe()
