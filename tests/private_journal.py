"""A journald of a test's own, to stop and restart at will without touching the machine's.

It runs in a private mount namespace (held open by a ``sleep``) where tmpfs hides the
machine's journal socket folder and journal files: the journald started in there creates its
own socket at the usual path and keeps its entries in that namespace only.  A daemon started
through ``prefix`` (nsenter) sees that journal and nothing else; ``entries`` reads it with a
journalctl run in the same namespace.  Leaving the block ends every process it started, and
the namespace with its mounts goes away with the last of them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator

from harness import JournalEntry, parse_journal
from tailcalld.journal import JOURNAL_SOCKET, journald_listening

JOURNALD = "/lib/systemd/systemd-journald"
# Hidden by a tmpfs each: the socket folder and the volatile journal files (folders on /run,
# itself a tmpfs, so creating them when missing leaves nothing on disk)...
HIDDEN = ["/run/systemd/journal", "/run/log/journal"]
# ...and the persistent journal, when there is one: never created, lest the machine's next
# journald switch to persistent storage.
HIDDEN_IF_THERE = ["/var/log/journal"]


class PrivateJournal:
    def __init__(self) -> None:
        self._holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"])
        self._journald: subprocess.Popen[bytes] | None = None
        try:
            self._wait(self._unshared, "the private mount namespace")
            for folder in HIDDEN:
                self.run("sh", "-c", f"mkdir -p {folder} && mount -t tmpfs tmpfs {folder}")
            for folder in HIDDEN_IF_THERE:
                self.run("sh", "-c", f"if [ -d {folder} ]; then mount -t tmpfs tmpfs {folder}; fi")
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> list[str]:
        """A command that execs its arguments inside the namespace."""
        # --root/--wd: entering a mount namespace resets the root to the namespace's; in a chroot
        # (fresh-machine.sh) that is the host's, where this checkout is not.
        return ["nsenter", "-t", str(self._holder.pid), "-m", "--root", "--wd", "--"]

    def run(self, *command: str) -> str:
        return subprocess.run([*self.prefix, *command], capture_output=True, text=True, check=True,
                              timeout=60).stdout

    def start(self) -> None:
        assert self._journald is None, "journald runs already"
        self._journald = subprocess.Popen([*self.prefix, JOURNALD], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        self._wait(self.listening, "the private journald")

    def stop(self) -> None:
        """As a crash or a restart would leave it: the socket file stays, nobody listens."""
        if self._journald is not None:
            self._journald.terminate()
            self._journald.wait(30)
            self._journald = None
        assert not self.listening()

    def listening(self) -> bool:
        # /proc/PID/root resolves paths in the holder's namespace, from ours.
        return journald_listening(f"/proc/{self._holder.pid}/root{JOURNAL_SOCKET}")

    def entries(self, **match: str) -> list[JournalEntry]:
        return parse_journal(self.run("journalctl", "--no-pager", "-o", "json",
                                      *[f"{k}={v}" for k, v in match.items()]))

    def close(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop()
        self._holder.kill()
        self._holder.wait(30)

    def _unshared(self) -> bool:
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/{self._holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        return False

    @staticmethod
    def _wait(ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not ready():
            assert time.monotonic() < deadline, f"{what} did not come up within 30 s"
            time.sleep(0.02)


@contextlib.contextmanager
def private_journal() -> Iterator[PrivateJournal]:
    journal = PrivateJournal()
    try:
        yield journal
    finally:
        journal.close()
