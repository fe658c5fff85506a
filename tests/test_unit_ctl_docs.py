"""Unit tests of tailcallctl's generated shell completion and man page (tailcalld/ctl_docs.py):
bash sources the completion and completes verbs, options, choices, files and syscall names;
groff renders the man page without a warning, and it names every verb and option."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest

from tailcalld import ctl, ctl_docs

def verbs_of_the_parser() -> list[str]:
    parser = ctl.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


VERBS = verbs_of_the_parser()


def test_the_verbs_include_the_protocol_s() -> None:
    assert set(ctl.VERBS) | {"events", "top"} <= set(VERBS)


@pytest.fixture(scope="module")
def bash_completion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "tailcallctl"
    path.write_text(ctl_docs.completion("bash", names=["fchmod", "fchmodat", "getppid", "openat"]))
    return path


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` (tailcallctl first), with ``script`` sourced
    the way bash-completion loads it, and the function `complete -p` names for tailcallctl."""
    program = f"""
set -u
source {script}
spec=$(complete -p tailcallctl)
[[ $spec =~ -F\\ ([A-Za-z0-9_]+) ]] || {{ echo "no completion function: $spec" >&2; exit 1; }}
COMP_WORDS=("$@")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="$*"
COMP_POINT=${{#COMP_LINE}}
COMPREPLY=()
"${{BASH_REMATCH[1]}}" tailcallctl "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", program, "bash", "tailcallctl", *words],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [line for line in r.stdout.splitlines() if line]


def test_bash_completes_the_verbs(bash_completion: Path) -> None:
    assert sorted(complete(bash_completion, "")) == VERBS
    assert complete(bash_completion, "sh") == ["show"]
    assert complete(bash_completion, "--json", "--socket", "/run/x.sock", "un") == ["unload-all"]


def test_bash_completes_options_before_and_after_the_verb(bash_completion: Path) -> None:
    assert complete(bash_completion, "--no") == ["--no-legend"]
    assert complete(bash_completion, "show", "getppid", "--no") == ["--no-legend", "--no-source"]
    assert "--fresh" in complete(bash_completion, "attach", "--")
    assert complete(bash_completion, "attach", "getppid", "h.c", "--dialect", "") == ["auto", "bcc", "libbpf"]


def test_bash_completes_syscall_names_for_slot(bash_completion: Path) -> None:
    assert complete(bash_completion, "attach", "fchm") == ["fchmod", "fchmodat"]
    assert complete(bash_completion, "show", "get") == ["getppid"]
    assert complete(bash_completion, "events", "--slot", "op") == ["openat"]


def test_bash_completes_files_for_file(bash_completion: Path, tmp_path: Path) -> None:
    (tmp_path / "handler.bpf.c").write_text("")
    assert complete(bash_completion, "attach", "getppid", f"{tmp_path}/hand") == [f"{tmp_path}/handler.bpf.c"]
    assert complete(bash_completion, "check", f"{tmp_path}/hand") == [f"{tmp_path}/handler.bpf.c"]


def test_slot_completes_this_machine_s_syscalls() -> None:
    names = ctl_docs.syscall_names()
    assert {"getppid", "fchmodat", "openat"} <= set(names)
    assert all(re.fullmatch(r"\w+", n) for n in names)
    script = ctl_docs.completion("bash")
    assert " fchmodat " in script and " getppid " in script


def test_zsh_loads_the_completion_for_tailcallctl(tmp_path: Path) -> None:
    script = ctl_docs.completion("zsh", names=["getppid"])
    assert script.startswith("#compdef tailcallctl")
    for verb in VERBS:
        assert re.search(rf"\b{re.escape(verb)}\b", script), verb
    assert "(getppid)" in script and "_files" in script
    (tmp_path / "_tailcallctl").write_text(script)
    r = subprocess.run(["zsh", "-n", str(tmp_path / "_tailcallctl")], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    # compinit, as a user's .zshrc runs it, finds the file on fpath and binds it to tailcallctl.
    program = (f"fpath=({tmp_path} $fpath); autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump; "
               "print -r -- $_comps[tailcallctl]")
    r = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "_tailcallctl\n", "")


def test_no_names_no_slot_completion(tmp_path: Path) -> None:
    """Where the syscall names cannot be read (no compiler), SLOT offers nothing, and the rest works."""
    script = tmp_path / "tailcallctl"
    script.write_text(ctl_docs.completion("bash", names=[]))
    assert ctl_docs.SYSCALLS_BASH not in script.read_text()
    assert complete(script, "attach", "get") == []
    assert complete(script, "det") == ["detach"]


def test_no_completion_for_other_shells() -> None:
    with pytest.raises(ValueError, match="no completion for 'fish'"):
        ctl_docs.completion("fish")


@pytest.fixture(scope="module")
def manpage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("man") / "tailcallctl.1"
    path.write_text(ctl_docs.manpage())
    return path


def test_groff_renders_the_man_page_without_a_warning(manpage: Path) -> None:
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(manpage)], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr) == (0, "")


def rendered(manpage: Path) -> str:
    r = subprocess.run(["man", "--warnings", "-l", str(manpage)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "PAGER": "cat"})
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    return re.sub(r".\x08", "", r.stdout)  # no overstrike bold, whatever the terminal


def test_man_shows_every_verb_and_option(manpage: Path) -> None:
    text = rendered(manpage)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS", "ENVIRONMENT",
                    "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.MULTILINE), heading
    for verb in VERBS:
        assert re.search(rf"^ +tailcallctl {re.escape(verb)}$", text, re.MULTILINE), verb
    for option in ("--json", "--no-legend", "--quiet", "--socket", "--timeout", "--version", "--no-source",
                   "--fresh", "--dialect", "--follow", "--iterations"):
        assert option in text, option
    for code, _ in ctl.EXIT_CODES:
        assert re.search(rf"^ +{code} +\S", text, re.MULTILINE), code
    assert "TAILCALLD_SOCKET" in text


def test_the_global_options_are_said_once(manpage: Path) -> None:
    """They are accepted on either side of the verb: the page lists them under OPTIONS only."""
    text = rendered(manpage)
    assert len(re.findall(r"^ +--no-legend$", text, re.MULTILINE)) == 1
    assert "usage: tailcallctl list [-h]" in text
