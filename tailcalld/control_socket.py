"""Where the control socket is when nobody says: the daemon's default (config.py) and the
client's (``$TAILCALLD_SOCKET``, else that default).  A module of its own so that tailcallctl
knows it without importing the daemon's config and its pydantic models."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SOCKET = Path("/run/tailcalld/tailcalld.sock")
SOCKET_ENV = "TAILCALLD_SOCKET"


def default_socket() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
