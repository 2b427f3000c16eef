"""sd_notify(3) for ``Type=notify`` units, in thirty lines of stdlib.

Scope: tell systemd that the agent is ready (``READY=1``), alive (``WATCHDOG=1``), what it
is doing (``STATUS=...``), that it needs longer (``EXTEND_TIMEOUT_USEC=``) and that it is
shutting down (``STOPPING=1``). Protocol, as in
sd_notify(3) and systemd's "notify socket" interface:

* ``$NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket: an absolute path, or a name in
  the abstract namespace written with a leading ``@`` (sent as a leading NUL byte).
  Anything else (unset, empty, ``vsock:`` addresses of newer systemd) means "not under
  systemd": every call is then a no-op that returns ``False``.
* One datagram per message, newline-separated ``KEY=VALUE`` assignments, UTF-8.
* ``$WATCHDOG_USEC`` is the watchdog timeout in microseconds, meant for us only if
  ``$WATCHDOG_PID`` is unset or equals our pid. sd_watchdog_enabled(3) recommends pinging at
  half the timeout; :func:`watchdog_interval_s` returns that half.

A failing send never raises (the agent must not die because the service manager went away):
it is counted in ``counters`` and the call returns ``False``. Values are sanitised: a newline
inside ``STATUS`` would start a new assignment, so it becomes a space.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Mapping

# STATUS is shown by `systemctl status`; keep it one short line.
MAX_STATUS_LEN = 200


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The socket address from ``$NOTIFY_SOCKET``, or None when not usable."""
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()        # abstract namespace (unix(7))
    if value.startswith("/"):
        return value
    return None


def watchdog_usec(environ: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """``$WATCHDOG_USEC`` if it is meant for this process (sd_watchdog_enabled(3)), else None."""
    env = os.environ if environ is None else environ
    owner = env.get("WATCHDOG_PID")
    if owner:
        if not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid):
            return None
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    return int(raw)


def watchdog_interval_s(environ: Mapping[str, str] | None = None,
                        pid: int | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``: half the timeout, or None without a watchdog."""
    usec = watchdog_usec(environ, pid)
    return None if usec is None else usec / 2_000_000


def _clean(value: str) -> str:
    return " ".join(value.split())[:MAX_STATUS_LEN]


class Notifier:
    """One notify socket, opened lazily. ``Notifier()`` reads the environment."""

    def __init__(self, address: str | bytes | None = None, *,
                 environ: Mapping[str, str] | None = None) -> None:
        self.address = address if address is not None else notify_address(environ)
        self.counters: Counter[str] = Counter()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased); True when the datagram left."""
        if self.address is None:
            return False
        text = "\n".join(f"{key.upper()}={_clean(str(value))}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self.address)
        except OSError:
            # The manager is gone or the socket queue is full: count it, never crash for it.
            self.counters["notify-failed"] += 1
            return False
        self.counters["notify-sent"] += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more time while starting or stopping (a spool
        recovering a large WAL on a slow SD card must not hit TimeoutStartSec)."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
