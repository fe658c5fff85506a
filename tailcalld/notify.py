"""What systemd hands a service and expects back: sd_notify, the watchdog, passed sockets.

Every function is a no-op (or returns None) outside systemd, so the daemon runs the same
in a terminal, a container or a unit.
"""

from __future__ import annotations

import os
import socket
import time

try:
    from systemd import daemon as _sd
except ImportError:  # no systemd-python: behave as if not under systemd
    _sd = None


def notify(*states: str) -> None:
    """Send sd_notify states (READY=1, STATUS=..., WATCHDOG=1, ...) when NOTIFY_SOCKET is set."""
    if _sd is not None and os.environ.get("NOTIFY_SOCKET"):
        _sd.notify("\n".join(states))


def reloading() -> None:
    # MONOTONIC_USEC lets systemd (253+) match this RELOADING=1 to the reload it asked for.
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def passed_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    if _sd is None:
        return None
    fds = _sd.listen_fds()  # also unsets LISTEN_FDS so children do not see it
    if not fds:
        return None
    for extra in fds[1:]:
        os.close(extra)  # tailcalld.socket declares one; anything else is not ours to serve
    return socket.socket(fileno=fds[0])
