"""Opening a python-can bus for a listening source (``dbc``, ``j1939``), with back-off.

A bus that cannot be opened yet (the SocketCAN interface is down, the SLCAN dongle is not
plugged in) is counted (``unavailable-bus-open``) and retried after a capped back-off: the
source waits for its hardware instead of failing. A missing python-can backend is not
something waiting fixes: AdapterUnavailable(missing-dependency).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

import can

from agent.backoff import Backoff
from agent.errors import AdapterUnavailable

OPEN_BACKOFF_INITIAL_S = 0.2
OPEN_BACKOFF_MAX_S = 30.0
REOPEN_PAUSE_S = 0.2  # after a bus that was open failed


async def open_bus(config: Mapping[str, Any], source_id: str,  # Any: can.Bus's **kwargs
                   counters: Counter[str]) -> can.BusABC:
    """A bus opened with ``can.Bus(**config)`` (in a thread: opening may block), retried
    until it opens; counts ``bus-opened`` once it is (tests and status: the source listens)."""
    backoff = Backoff(OPEN_BACKOFF_INITIAL_S, OPEN_BACKOFF_MAX_S)
    while True:
        try:
            bus = await asyncio.to_thread(lambda: can.Bus(**config))
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            counters["unavailable-bus-open"] += 1
            if isinstance(exc, ImportError):
                raise AdapterUnavailable(str(exc), source=source_id,
                                         reason="missing-dependency") from exc
            await asyncio.sleep(backoff.next())
            continue
        counters["bus-opened"] += 1
        return bus
