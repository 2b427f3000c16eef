"""The runtime's ``status`` task: the snapshot file and systemd's STATUS=/WATCHDOG=.

Scope: one coroutine, :func:`publish_status`, run by the supervisor as task ``status``, and
the one-line summary systemd shows (:func:`status_line`). The model and the file format are
agent/status.py.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable
from pathlib import Path

from agent.errors import EdgeAgentError
from agent.status import AgentStatus, write_status


def status_line(status: AgentStatus) -> str:
    """One line for systemd's ``STATUS=`` (shown by ``systemctl status``)."""
    rate = sum(source.rate_hz for source in status.sources)
    running = sum(source.state == "running" for source in status.sources)
    parts = [f"{status.state}: {running}/{len(status.sources)} sources, {rate:.1f} readings/s"]
    if status.spool is not None:
        parts.append(f"spool {status.spool.depth}")
    if status.uplink is not None:
        parts.append(f"uplink {status.uplink.state}")
    parts += [f"channel {ch.state} nonce {ch.nonce}" for ch in status.channels[:2]]
    return ", ".join(parts)


class Notify(typing.Protocol):
    def status(self, text: str) -> bool: ...

    def watchdog(self) -> bool: ...


async def publish_status(snapshot: Callable[[], AgentStatus], path: Path, interval_s: float,
                         notifier: Notify | None = None,
                         watchdog_interval_s: float | None = None,
                         on_error: Callable[[BaseException], None] | None = None) -> None:
    """The runtime's ``status`` task: until cancelled, every tick write the snapshot, send
    ``WATCHDOG=1`` and (when it changed) ``STATUS=``.

    The tick is ``interval_s``, shortened to ``watchdog_interval_s`` (half of systemd's
    WatchdogSec, :func:`agent.sdnotify.watchdog_interval_s`) when that is shorter. Pinging
    from this event-loop task is deliberate: a loop that hangs stops the pings and systemd
    restarts the agent. A failed write goes to ``on_error`` and the task goes on.
    """
    tick = min(interval_s, watchdog_interval_s or interval_s)
    last_line = None
    while True:
        status = snapshot()
        try:
            write_status(path, status)
        except EdgeAgentError as exc:
            if on_error is not None:
                on_error(exc)
        if notifier is not None:
            notifier.watchdog()
            line = status_line(status)
            if line != last_line:
                notifier.status(line)
                last_line = line
        await asyncio.sleep(tick)


