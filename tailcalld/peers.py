"""Who is on the other end of a control connection (SO_PEERCRED), and may they act."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    comm: str

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        return cls(pid, uid, gid, _comm(pid))

    @classmethod
    def this_process(cls) -> Peer:
        return cls(os.getpid(), os.getuid(), os.getgid(), _comm(os.getpid()))

    def groups(self) -> set[int]:
        """Primary and supplementary groups (SO_PEERCRED only gives the primary one)."""
        found = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("Groups:"):
                        found |= {int(g) for g in line.split()[1:]}
        except OSError:
            pass  # the peer is gone: judge it on its primary group alone
        return found

    def journal_fields(self) -> dict[str, object]:
        return {"PEER_UID": self.uid, "PEER_PID": self.pid, "PEER_GID": self.gid, "PEER_COMM": self.comm}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def may_control(peer: Peer, allowed_gid: int | None) -> bool:
    """root always; otherwise only members of the configured group (root-equivalent: it loads BPF)."""
    return peer.uid == 0 or (allowed_gid is not None and allowed_gid in peer.groups())
