"""tailcalld as a service under a real systemd (../shared/systemd/ci-systemd.sh boots one as
PID 1 of private namespaces): make install, Type=notify start, reload, journal, socket
activation, watchdog, and the hardened unit running the whole cycle with the capabilities it
is bounded to (CAP_BPF CAP_PERFMON CAP_CHOWN, no CAP_SYS_ADMIN), each of which is needed.

The host shares /etc, /opt, /tmp and /sys/fs/bpf with that systemd, so `make install` runs
here and the counting handler's map is read from here.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import (CAP_SYS_ADMIN, NR_FCHMODAT, JournalEntry, counting_handler, fchmodat, libbpf_pinned_handler,
                     new_pin_root, parse_journal, read_counter, remove_pin_tree, unit_capabilities, wait_journal)
from tailcalld.audit import CHANGE_MESSAGE_ID, FAILED_MESSAGE_ID
from tailcalld.journal import MISS_MESSAGE_ID

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = [os.environ.get("TAILCALLD_CI_SYSTEMD", ""), str(REPO.parent / "shared/systemd/ci-systemd.sh"),
              "/work/shared/systemd/ci-systemd.sh"]
CI_SYSTEMD = next((Path(p) for p in CANDIDATES if p and Path(p).is_file()), None)
CONFIG = Path("/etc/tailcalld/tailcalld.toml")
DROP_IN = Path("/etc/systemd/system/tailcalld.service.d/50-test.conf")
SERIAL_LOCK = Path("/tmp/tailcalld-test-systemd.lock")

pytestmark = pytest.mark.skipif(CI_SYSTEMD is None, reason="ci-systemd.sh (../shared/systemd) not found")


@dataclass
class Systemd:
    env: dict[str, str]
    pin_dir: Path
    maps: Path
    files: Path  # handler sources, in /tmp: shared with the booted systemd, where tailcallctl runs

    def source_file(self, text: str, suffix: str = ".c") -> str:
        path = self.files / f"handler-{secrets.token_hex(3)}{suffix}"
        path.write_text(text)
        return str(path)

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", str(CI_SYSTEMD), "exec", *cmd], capture_output=True, text=True,
                           env=self.env, timeout=timeout, cwd=REPO)
        if check and r.returncode != 0:
            log = subprocess.run(["bash", str(CI_SYSTEMD), "exec", "journalctl", "--no-pager", "-n", "30",
                                  "-u", "tailcalld"], capture_output=True, text=True, env=self.env).stdout
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n"
                                 f"journal:\n{log}")
        return r

    def show(self, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, "tailcalld.service").stdout.strip()

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("tailcallctl", *args, check=check)

    def capabilities(self) -> set[int]:
        """The running daemon's effective capabilities (its /proc is the booted systemd's)."""
        status = self.run("cat", f"/proc/{self.show('MainPID')}/status").stdout
        [mask] = [ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")]
        return {bit for bit in range(64) if int(mask, 16) >> bit & 1}

    def listed(self) -> dict[int, int]:
        return {s["slot"]: s["prog_id"] for s in json.loads(self.ctl("list", "--json").stdout)["slots"]}

    def journal(self, *match: str) -> list[JournalEntry]:
        """The unit's entries in the booted systemd's journal (not the host's)."""
        return parse_journal(self.run("journalctl", "--no-pager", "-o", "json", "-u", "tailcalld", *match).stdout)

    def wait_journal(self, predicate: Callable[[JournalEntry], bool], timeout: float = 30,
                     *match: str) -> list[JournalEntry]:
        return wait_journal(lambda: [e for e in self.journal(*match) if predicate(e)], timeout=timeout, period=0.3)


# Each run's state_dir of its own, inside the unit's StateDirectory (the only place it may write
# below /var): a run that failed half-way leaves no recorded handlers for the next one to rebuild.
STATE_DIR = Path(f"/var/lib/tailcalld/test-{secrets.token_hex(3)}")


def write_config(pin_dir: Path, interval: float, extra: str = "") -> None:
    CONFIG.write_text(f'pin_dir = "{pin_dir}"\nstate_dir = "{STATE_DIR}"\nmiss_log_interval = {interval}\n{extra}')


def make(target: str) -> None:
    r = subprocess.run(["make", "-C", str(REPO), target], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"make {target}:\n{r.stdout}\n{r.stderr}"


@pytest.fixture(scope="module")
def one_at_a_time() -> Iterator[None]:
    """These tests share the machine's /opt/tailcalld, /etc/tailcalld and /var/lib/tailcalld
    (ci-systemd shares /etc and /var with the host), so two runs of them (two worktrees) would
    install over each other and run two daemons on one state_dir, which the second refuses.
    A machine-wide lock makes a second run wait for the first."""
    with open(SERIAL_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def systemd(machine: None, one_at_a_time: None) -> Iterator[Systemd]:
    env = {**os.environ, "CI_SYSTEMD_DIR": f"/tmp/ci-systemd-tailcalld-{secrets.token_hex(3)}"}
    pin_root = new_pin_root()
    files = Path(tempfile.mkdtemp(prefix="tailcalld-test-systemd-"))
    files.chmod(0o755)
    had_config = CONFIG.exists()
    up = subprocess.run(["bash", str(CI_SYSTEMD), "up"], capture_output=True, text=True, env=env, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        make("install")
        write_config(pin_root / "daemon", 1)
        # Quick watchdog for the test: the shipped 10 s works the same, only slower.
        DROP_IN.parent.mkdir(parents=True, exist_ok=True)
        DROP_IN.write_text("[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n")
        sd = Systemd(env, pin_root / "daemon", pin_root / "maps", files)
        sd.run("systemctl", "daemon-reload")
        yield sd
    finally:
        shutil.rmtree(files, ignore_errors=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        subprocess.run(["bash", str(CI_SYSTEMD), "exec", "systemctl", "stop", "tailcalld.socket", "tailcalld.service"],
                       env=env, capture_output=True, timeout=120)
        DROP_IN.unlink(missing_ok=True)
        if DROP_IN.parent.exists() and not any(DROP_IN.parent.iterdir()):
            DROP_IN.parent.rmdir()
        if not had_config:  # ours, rewritten by the tests: uninstall would keep it as "edited"
            CONFIG.unlink(missing_ok=True)
        subprocess.run(["make", "-C", str(REPO), "uninstall"], capture_output=True, timeout=300)
        # The uninstall took the catalog that make setup installs for the checkout too: put it back.
        subprocess.run(["bash", str(REPO / "scripts/install.sh"), "catalog"], capture_output=True, timeout=120)
        subprocess.run(["bash", str(CI_SYSTEMD), "down"], env=env, capture_output=True, timeout=120)
        remove_pin_tree(pin_root)


def test_start_reload_journal_stop(systemd: Systemd) -> None:
    sd = systemd
    since = f"--since=@{time.time() - 1:.0f}"
    # make install rendered the unit for its PREFIX and CONFDIR (the defaults here).
    assert sd.show("ExecStart").startswith("{ path=/opt/tailcalld/bin/tailcalld ; "
                                           "argv[]=/opt/tailcalld/bin/tailcalld --config /etc/tailcalld/tailcalld.toml ;")
    sd.run("systemctl", "start", "tailcalld.service")
    # Type=notify: start returned, so READY=1 came, so the socket already accepts.
    assert sd.run("systemctl", "is-active", "tailcalld.service").stdout.strip() == "active"
    assert "tailcalld" in sd.ctl("ping").stdout
    assert sd.show("StatusText").startswith("0 slots in use")

    # Bounded to the unit's set, without CAP_SYS_ADMIN: everything below works with that.
    assert sd.show("CapabilityBoundingSet").split() == ["cap_chown", "cap_perfmon", "cap_bpf"]
    assert sd.capabilities() == CAPS and CAP_SYS_ADMIN not in sd.capabilities()

    # The hardened unit compiles, loads and swaps handlers.
    counter = sd.maps / "count"
    attach = sd.ctl("attach", str(NR_FCHMODAT), sd.source_file(counting_handler(counter)))
    assert "attached count_calls to fchmodat (268)" in attach.stdout
    # libbpf C too: clang, bpftool's vmlinux.h and libbpf all work inside the sandbox, also
    # for a map libbpf pins by name, and timing the handlers.
    check = sd.ctl("check", str(REPO / "examples/fchmodat_libbpf.bpf.c"), "--function", "enter_fchmodat")
    assert "enter_fchmodat (libbpf) verified" in check.stdout
    sd.ctl("attach", str(LIBBPF_SLOT), str(REPO / "examples/fchmodat_libbpf.bpf.c"), "--function", "enter_fchmodat")
    sd.ctl("attach", str(PINNED_SLOT), sd.source_file(libbpf_pinned_handler("byname_hits"), ".bpf.c"))
    assert list((sd.pin_dir / "handlers").glob("*/byname_hits"))
    sd.ctl("timing", "5")
    fchmodat(100)
    assert read_counter(counter) == 100
    sd.ctl("detach", str(LIBBPF_SLOT))

    # A restart adopts the pins: the same programs, nothing corrected, nothing opened by id.
    before = sd.listed()
    sd.run("systemctl", "restart", "tailcalld.service")
    status = json.loads(sd.ctl("status", "--json").stdout)
    assert status["adopted"] and status["corrections"] == [] and sd.listed() == before

    # Reload with a new interval: the handler keeps counting through it.
    write_config(sd.pin_dir, 2)
    fchmodat(50)
    sd.run("systemctl", "reload", "tailcalld.service")
    fchmodat(50)
    assert read_counter(counter) == 200
    status = json.loads(sd.ctl("status", "--json").stdout)
    assert status["miss_log_interval"] == 2 and status["slots_used"] == 2

    # A broken config on reload: refused, logged, the old one stays in force.
    CONFIG.write_text('pin_dir = "/sys/fs/bpf/elsewhere"\nmiss_log_interval = -5\n')
    sd.run("systemctl", "reload", "tailcalld.service")
    assert sd.run("systemctl", "is-active", "tailcalld.service").stdout.strip() == "active"
    assert json.loads(sd.ctl("status", "--json").stdout)["miss_log_interval"] == 2
    refused = sd.wait_journal(lambda e: "reload refused" in e.get("MESSAGE", ""))
    assert refused and refused[0]["PRIORITY"] == "3" and "miss_log_interval" in refused[0]["MESSAGE"]
    write_config(sd.pin_dir, 1)
    sd.run("systemctl", "reload", "tailcalld.service")

    # Misses after a detach reach the journal with their fields and MESSAGE_ID.
    sd.ctl("detach", str(PINNED_SLOT))
    sd.ctl("detach", "fchmodat")
    fchmodat(300)
    misses = sd.wait_journal(lambda e: e.get("SYSCALL_NAME") == "fchmodat", 30, f"MESSAGE_ID={MISS_MESSAGE_ID}")
    assert misses, "no miss entry in the unit's journal"
    assert misses[0]["SYSCALL_NR"] == "268" and int(misses[0]["MISSES"]) >= 1
    assert misses[0]["SYSLOG_IDENTIFIER"] == "tailcalld"
    explained = sd.run("journalctl", "--no-pager", "-x", "-u", "tailcalld", f"MESSAGE_ID={MISS_MESSAGE_ID}").stdout
    assert "Tail-call misses on fchmodat (268)" in explained  # the catalog entry

    # A refused attach is audited with the peer that asked; the installed catalog explains it.
    broken = sd.ctl("attach", "fchmodat", sd.source_file("int h(struct bpf_raw_tracepoint_args *c) { return x; }\n"),
                    check=False)
    assert broken.returncode != 0 and "undeclared identifier 'x'" in broken.stderr
    failed = sd.wait_journal(lambda e: e.get("ERROR_CODE") == "compile_error", 30, f"MESSAGE_ID={FAILED_MESSAGE_ID}")
    assert failed and (failed[0]["PEER_UID"], failed[0]["PEER_COMM"]) == ("0", "tailcallctl")
    explained = sd.run("journalctl", "--no-pager", "-x", "-u", "tailcalld", f"MESSAGE_ID={FAILED_MESSAGE_ID}").stdout
    assert "tailcalld refused a change: attach-failed (compile_error)" in explained
    explained = sd.run("journalctl", "--no-pager", "-x", "-u", "tailcalld", f"MESSAGE_ID={CHANGE_MESSAGE_ID}").stdout
    assert "tailcalld slot change: attach by uid 0" in explained

    sd.run("systemctl", "stop", "tailcalld.service")
    assert sd.show("Result") == "success" and sd.show("ExecMainStatus") == "0"
    messages = [e["MESSAGE"] for e in sd.journal()]
    for expected in ("ready: dispatcher program", "reloaded /etc/tailcalld/tailcalld.toml", "stopping;"):
        assert any(expected in m for m in messages), (expected, messages)
    # The unit's syscall filter lets the compile workers confine themselves with Landlock.
    assert not any("no Landlock" in m for m in messages), messages
    # Every entry the daemon wrote names it (no instance set: its pin folder), and nothing it
    # said reached the journal around its logger (a stdout/stderr line carries no fields).
    own = sd.journal(since, "_SYSTEMD_UNIT=tailcalld.service")
    assert own and {e.get("TAILCALLD_INSTANCE") for e in own} == {str(sd.pin_dir)}, [
        (e.get("_TRANSPORT"), e.get("MESSAGE")) for e in own if e.get("TAILCALLD_INSTANCE") != str(sd.pin_dir)]
    # Stopped, yet the pins keep the dispatcher running: tracing does not depend on the daemon.
    assert (sd.pin_dir / "link").exists()


CAPS = {0, 38, 39}  # CAP_CHOWN, CAP_PERFMON, CAP_BPF
LIBBPF_SLOT, PINNED_SLOT = 300, 301  # fanotify_init, fanotify_mark: rarely called


def test_socket_activation_starts_the_service(systemd: Systemd) -> None:
    sd = systemd
    sd.run("systemctl", "stop", "tailcalld.service")
    sd.run("systemctl", "start", "tailcalld.socket")
    assert sd.run("systemctl", "is-active", "tailcalld.service", check=False).stdout.strip() != "active"
    listed = sd.ctl("list")
    assert listed.returncode == 0 and "slots listed." in listed.stdout
    assert sd.run("systemctl", "is-active", "tailcalld.service").stdout.strip() == "active"
    # Adopted the pins the first test left, rather than loading a second dispatcher.
    assert json.loads(sd.ctl("status", "--json").stdout)["adopted"] is True


def test_watchdog_restarts_a_stuck_daemon(systemd: Systemd) -> None:
    sd = systemd
    sd.run("systemctl", "start", "tailcalld.service")
    pid = sd.show("MainPID")
    restarts = int(sd.show("NRestarts"))
    sd.run("kill", "-STOP", pid)  # the event loop stops; so do its WATCHDOG=1 pings
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if int(sd.show("NRestarts")) > restarts and sd.show("ActiveState") == "active":
            break
        time.sleep(0.5)
    assert int(sd.show("NRestarts")) > restarts, "systemd did not restart the stuck daemon"
    assert sd.show("MainPID") != pid
    assert "tailcalld" in sd.ctl("ping").stdout
    assert any("watchdog timeout" in e.get("MESSAGE", "").lower() for e in sd.journal())


SOCKET = "/run/tailcalld/tailcalld.sock"


def test_allowed_group_works_under_the_hardened_unit(systemd: Systemd) -> None:
    """Giving the socket to allowed_group is a chown: the unit's capabilities must allow it,
    whether the daemon binds the socket itself or systemd's socket unit made it."""
    sd = systemd
    sd.run("systemctl", "stop", "tailcalld.socket", "tailcalld.service")
    write_config(sd.pin_dir, 1, 'allowed_group = "nogroup"\n')
    as_nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "tailcallctl")
    try:
        sd.run("systemctl", "start", "tailcalld.service")
        assert sd.run("stat", "-c", "%a %U %G", SOCKET).stdout.split() == ["660", "root", "nogroup"]
        assert "tailcalld" in sd.run(*as_nobody, "ping").stdout  # a member of the group is served

        sd.run("systemctl", "stop", "tailcalld.service")
        sd.run("systemctl", "start", "tailcalld.socket")
        assert "tailcalld" in sd.ctl("ping").stdout  # activates the service on systemd's 0600 socket
        assert sd.run("stat", "-c", "%a %U %G", SOCKET).stdout.split() == ["660", "root", "nogroup"]
        assert "tailcalld" in sd.run(*as_nobody, "ping").stdout
    finally:
        sd.run("systemctl", "stop", "tailcalld.socket", "tailcalld.service", check=False)
        write_config(sd.pin_dir, 1)


CAPS_DROP_IN = DROP_IN.with_name("60-capabilities.conf")
# What a first start without each capability of the unit's set runs into, as its journal says.
WITHOUT = {"CAP_BPF": "create map", "CAP_PERFMON": "the kernel refused 'tcd_", "CAP_CHOWN": "tailcalld.sock"}


@pytest.mark.parametrize("dropped", sorted(WITHOUT))
def test_each_capability_of_the_set_is_needed(systemd: Systemd, dropped: str) -> None:
    """The measurement behind the unit's CapabilityBoundingSet=: a first start (a pin folder of
    its own, nothing to adopt, allowed_group set) fails without any one of them."""
    sd = systemd
    assert set(WITHOUT) == set(unit_capabilities())
    sd.run("systemctl", "stop", "tailcalld.socket", "tailcalld.service")
    kept = " ".join(cap for cap in unit_capabilities() if cap != dropped)
    CAPS_DROP_IN.write_text(f"[Service]\nCapabilityBoundingSet=\nCapabilityBoundingSet={kept}\nRestart=no\n")
    pin_dir = sd.pin_dir.parent / f"first-start-without-{dropped.lower()}"
    write_config(pin_dir, 1, 'allowed_group = "nogroup"\n')
    try:
        sd.run("systemctl", "daemon-reload")
        assert sd.run("systemctl", "start", "tailcalld.service", check=False).returncode != 0
        pid = sd.show("ExecMainPID")
        said = [e.get("MESSAGE", "") for e in sd.wait_journal(lambda e: "cannot start" in e.get("MESSAGE", ""),
                                                              10, f"_PID={pid}")]
        assert said and WITHOUT[dropped] in said[0], said
    finally:
        CAPS_DROP_IN.unlink(missing_ok=True)
        sd.run("systemctl", "daemon-reload")
        sd.run("systemctl", "reset-failed", "tailcalld.service", check=False)
        write_config(sd.pin_dir, 1)
