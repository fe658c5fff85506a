"""`make install` staged with DESTDIR, as a package build runs it: every file lands below
DESTDIR, named for where it will live; the unit's ExecStart follows PREFIX and CONFDIR; nothing
of this machine changes; and the staged tree, put at its PREFIX and CONFDIR (bind mounts in a
mount namespace of its own), starts from the unit's ExecStart line, compiles and counts.

test_systemd.py runs the unstaged `make install` under a real systemd."""

from __future__ import annotations

import configparser
import fcntl
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, DaemonProcess, counting_handler, fchmodat, read_counter, remove_pin_tree,
                     new_pin_root, write_config)

REPO = Path(__file__).resolve().parent.parent
# What an unstaged install would write or rebuild; a staged one leaves them as they are.
MACHINE = [Path(p) for p in ("/etc/systemd/system/tailcalld.service", "/etc/systemd/system/tailcalld.socket",
                             "/usr/local/bin/tailcalld", "/usr/local/bin/tailcallctl", "/etc/tailcalld",
                             "/opt/tailcalld", "/usr/lib/systemd/catalog/tailcalld.catalog",
                             "/var/lib/systemd/catalog/database")]
SERIAL_LOCK = Path("/tmp/tailcalld-test-systemd.lock")  # test_systemd.py's: it installs on the machine


@dataclass(frozen=True)
class Staged:
    destdir: Path
    prefix: Path
    confdir: Path

    def at(self, path: Path | str) -> Path:
        """Where the file that will live at ``path`` is staged."""
        return self.destdir / str(path).lstrip("/")


def fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    root = tmp_path_factory.mktemp("install")
    s = Staged(root / "stage", root / "opt" / "tailcalld", root / "etc" / "tailcalld")
    with SERIAL_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # no test_systemd run installs on the machine meanwhile
        before = {p: fingerprint(p) for p in MACHINE}
        r = subprocess.run(["make", "-C", str(REPO), "install", f"PREFIX={s.prefix}", f"CONFDIR={s.confdir}",
                            f"DESTDIR={s.destdir}"], capture_output=True, text=True, timeout=600)
        after = {p: fingerprint(p) for p in MACHINE}
    assert r.returncode == 0, f"make install:\n{r.stdout}\n{r.stderr}"
    assert after == before  # nothing of the machine's touched...
    assert not s.prefix.exists() and not s.confdir.exists()  # ...nor the final places
    yield s


def test_the_unit_runs_what_prefix_and_confdir_name(staged: Staged) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(staged.at("/etc/systemd/system/tailcalld.service"))
    assert unit["Service"]["ExecStart"] == f"{staged.prefix}/bin/tailcalld --config {staged.confdir}/tailcalld.toml"
    shipped = (REPO / "contrib/tailcalld.service").read_text()
    rendered = staged.at("/etc/systemd/system/tailcalld.service").read_text()
    # Only ExecStart= changed: every other line is as shipped (which names the default places).
    assert [ln for ln in rendered.splitlines() if not ln.startswith("ExecStart=")] == [
        ln for ln in shipped.splitlines() if not ln.startswith("ExecStart=")]
    assert "ExecStart=/opt/tailcalld/bin/tailcalld --config /etc/tailcalld/tailcalld.toml" in shipped.splitlines()


def test_every_file_is_staged_and_names_its_final_place(staged: Staged) -> None:
    for name in ("tailcalld", "tailcallctl"):
        assert os.readlink(staged.at(f"/usr/local/bin/{name}")) == f"{staged.prefix}/bin/{name}"
        assert staged.at(staged.prefix / "bin" / name).read_text().startswith(f"#!{staged.prefix}/bin/python\n")
    assert staged.at("/usr/lib/systemd/catalog/tailcalld.catalog").read_bytes() == (
        REPO / "contrib/tailcalld.catalog").read_bytes()
    assert staged.at(staged.confdir / "tailcalld.toml").read_bytes() == (REPO / "config/tailcalld.toml").read_bytes()
    assert staged.at("/etc/systemd/system/tailcalld.socket").read_bytes() == (
        REPO / "contrib/tailcalld.socket").read_bytes()
    # No file says where it was staged: not a script, not the venv's config, not a compiled module
    # (the file names tracebacks show).
    mention = str(staged.destdir).encode()
    files = [p for p in staged.destdir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 100
    assert [p for p in files if mention in p.read_bytes()] == []


@pytest.mark.usefixtures("machine")
def test_the_staged_tree_runs_from_its_place(staged: Staged, tmp_path: Path) -> None:
    """What the package's users get: the unit's ExecStart line, run as written where PREFIX is the
    staged venv and CONFDIR a folder with this test's config (bind mounts seen by that process
    alone), serves the linked tailcallctl, compiles a handler with the staged venv, and counts."""
    pin_root = new_pin_root()
    sock = tmp_path / "tailcalld.sock"
    conf = tmp_path / "conf"
    conf.mkdir()
    write_config(conf / "tailcalld.toml", pin_dir=pin_root / "daemon", socket=sock, state_dir=tmp_path / "state")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(staged.at("/etc/systemd/system/tailcalld.service"))
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    mounts = " && ".join(f"mkdir -p {to} && mount --bind {what} {to}"
                         for what, to in ((staged.at(staged.prefix), staged.prefix), (conf, staged.confdir)))
    log = tmp_path / "daemon.log"
    with log.open("w") as out:  # unshare and sh exec: the daemon keeps the pid
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 f'{mounts} && exec "$@"', "sh", *exec_start],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    d = DaemonProcess(proc, sock, pin_root / "daemon", conf / "tailcalld.toml", log, time.time())
    try:
        ctl = ["nsenter", f"--target={proc.pid}", "--mount", "--", str(staged.at("/usr/local/bin/tailcallctl")),
               "--socket", str(sock)]
        for _ in range(600):
            assert proc.poll() is None, d.output()
            if sock.exists() and subprocess.run([*ctl, "ping"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        source = tmp_path / "count.c"
        source.write_text(counting_handler(pin_root / "maps" / "count"))
        attached = subprocess.run([*ctl, "attach", str(NR_FCHMODAT), str(source)], capture_output=True, text=True,
                                  timeout=120)
        assert attached.returncode == 0, attached.stderr + d.output()
        fchmodat(25)
        assert read_counter(pin_root / "maps" / "count") == 25
        # systemd finds nothing wrong with the unit where its paths exist.
        verify = subprocess.run(["nsenter", f"--target={proc.pid}", "--mount", "--", "systemd-analyze", "verify",
                                 str(staged.at("/etc/systemd/system/tailcalld.service"))],
                                capture_output=True, text=True, timeout=60)
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
        # The daemon is the staged venv's, started through its script's shebang.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert cmdline[:4] == [f"{staged.prefix}/bin/python", *exec_start], cmdline
    finally:
        try:
            assert d.stop() == 0, d.output()
        finally:
            remove_pin_tree(pin_root)
            for p in (staged.prefix, staged.confdir):  # the empty mount points the namespace made
                if p.exists():
                    p.rmdir()
