"""The install step that puts tailcallctl's man page and completion in place (scripts/install.sh,
run by `make install`), here into a temporary DATADIR from this checkout's venv: the files land
where man and bash-completion look, man renders the page, bash completes from the installed file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness import REPO, VENV_BIN
from test_unit_ctl_docs import complete


def test_install_puts_the_man_page_and_completion_in_the_usual_folders(tmp_path: Path) -> None:
    data = tmp_path / "share"
    env = {**os.environ, "PREFIX": str(VENV_BIN.parent), "DATADIR": str(data), "TAILCALLD_SOCKET": "/elsewhere"}
    r = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "ctl-docs"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    page = data / "man/man1/tailcallctl.1"
    bash = data / "bash-completion/completions/tailcallctl"
    zsh = data / "zsh/site-functions/_tailcallctl"
    assert sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file()) == sorted(
        p.relative_to(data) for p in (page, bash, zsh))
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (page, bash, zsh))

    # man finds it by name under MANPATH, as under /usr/local/share/man after make install.
    shown = subprocess.run(["man", "--warnings", "tailcallctl"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MANPATH": str(data / "man"), "MANWIDTH": "100", "PAGER": "cat"})
    assert (shown.returncode, shown.stderr) == (0, "")
    assert "tailcallctl show" in shown.stdout
    assert "/elsewhere" not in shown.stdout  # the page says the default socket, not the installer's

    assert complete(bash, "sta") == ["status"]
    assert complete(bash, "detach", "getpp") == ["getppid"]  # this machine's syscall names
    assert zsh.read_text().startswith("#compdef tailcallctl")
    assert not any("/elsewhere" in p.read_text() for p in (bash, zsh))
