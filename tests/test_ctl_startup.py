"""tailcallctl imports only what a verb needs (issue 14 item 3): `--help`, `list` and `status`,
run as people run them (the installed console script, against a real tailcalld), load neither
pydantic nor the protocol's models nor tabulate nor any other verb's modules.  What is imported is
read from Python's own -X importtime report; nothing here looks at how long anything took."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import VENV_BIN, DaemonProcess
from tailcalld import ctl, ctl_parser

# None is needed to parse arguments, ask the daemon and print a table; together they were most of
# what tailcallctl spent starting, several times a bare Python start (pydantic and the models alone
# were more than one).
HEAVY = ("pydantic", "pydantic_core", "tabulate", "importlib.metadata", "asyncio", "dataclasses", "inspect", "typing",
         "shutil", "threading", "tailcalld.spinner",
         "tailcalld.protocol", "tailcalld.config", "tailcalld.server", "tailcalld.commands",
         "tailcalld.metrics_http", "tailcalld.apply_cli", "tailcalld.events_cli", "tailcalld.top",
         "tailcalld.elfstrip", "tailcalld.local_headers", "tailcalld.dialects")
HANDLER = "int on_getpgid(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"


def imported(d: DaemonProcess | None, *argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the console script with -X importtime; its result, and every module it imported
    (the interpreter's own start included)."""
    env = {"TAILCALLD_SOCKET": str(d.socket if d else "/nonexistent/tailcalld.sock"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-X", "importtime", str(VENV_BIN / "tailcallctl"), *argv],
                       capture_output=True, text=True, env=env, timeout=60)
    report = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[1].strip() for line in report[1:]}
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    assert "tailcalld.ctl" in modules and "argparse" in modules, f"no import report read:\n{r.stderr}"
    return r, modules


def test_help_imports_nothing_heavy() -> None:
    r, modules = imported(None, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: tailcallctl") and "exit codes:" in r.stdout
    assert "tailcalld.client" in modules  # the default socket is shown: read without the daemon's config
    assert sorted(modules.intersection(HEAVY)) == []


def test_list_and_status_on_a_real_daemon_import_nothing_heavy(daemon: DaemonProcess) -> None:
    daemon.call("attach", slot="getpgid", source=HANDLER, filename="quiet.c")
    r, modules = imported(daemon, "list")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:4] == ["SLOT", "SYSCALL", "HOOK", "FUNCTION"]
    assert row.split()[:4] == ["121", "getpgid", "enter", "on_getpgid"] and "quiet.c" in row
    assert r.stdout.endswith("\n1 slot listed.\n")
    assert sorted(modules.intersection(HEAVY)) == []

    r, modules = imported(daemon, "status")
    assert r.returncode == 0, r.stderr
    assert "Slots       1 in use of" in r.stdout and f"PID         {daemon.pid}" in r.stdout
    assert sorted(modules.intersection(HEAVY)) == []


def test_verbs_that_need_more_import_it(daemon: DaemonProcess) -> None:
    """The other side: a reply the plain reading does not know goes through the models, and the
    models are there when it does (ping's reply has no plain reader)."""
    r, modules = imported(daemon, "ping")
    assert r.returncode == 0 and r.stdout.startswith("tailcalld ")
    assert {"pydantic", "tailcalld.protocol"} <= modules
    assert "tabulate" not in modules


@pytest.mark.parametrize("verb", sorted(ctl.VERBS))
def test_each_verbs_printer_takes_its_model(verb: str) -> None:
    """What mypy checked when VERBS held the model classes: the printer's argument is the very
    model the reply is validated with (by name now, so that the models load only when needed)."""
    from typing import get_type_hints

    from tailcalld import protocol

    v = ctl.VERBS[verb]
    hints = get_type_hints(v.show, globalns={**vars(protocol), **vars(ctl)})
    assert hints["r"] is getattr(protocol, v.model)


def test_console_script_is_the_plain_kind() -> None:
    """setuptools' older script wrappers imported pkg_resources or importlib.metadata to find the
    entry point (a bare start's worth); pip's imports the module and calls main."""
    script = Path(VENV_BIN / "tailcallctl").read_text()
    assert "from tailcalld.ctl import main" in script
    assert "importlib.metadata" not in script and "pkg_resources" not in script


ARGVS = [[], ["list"], ["--json", "status", "--no-legend"], ["status", "--socket", "/x", "--timeout", "3"],
         ["--socket", "list", "status"], ["attach", "268", "f.c", "-D", "X", "--set", "a=1", "--exit"],
         ["top", "--interval", "2"], ["show", "fchmodat", "--source"], ["save", "-o", "x.toml"],
         ["apply", "slots.toml", "--dry-run"], ["metrics", "--metrics-socket", "/m"], ["timing"], ["events", "-f"],
         # refused
         ["frob"], ["list", "x"], ["attach"], ["top", "--interval", "-1"], ["show", "1", "--source", "--no-source"],
         ["--timeout"], ["status", "--bogus"]]


def _outcome(parser_of: Any, argv: list[str]) -> str:
    try:
        return repr(sorted(vars(parser_of().parse_args(argv)).items()))
    except ctl_parser.ArgumentsError as err:
        return err.usage + err.message


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_lazy_parser_parses_as_the_whole_one(argv: list[str]) -> None:
    """tailcallctl makes only the parser of the verb it runs; what it parses, and what it says of
    arguments it refuses, is the same as with every verb's parser made."""
    assert _outcome(lambda: ctl_parser.build_parser(lazy=True), argv) == _outcome(ctl_parser.build_parser, argv)


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["attach", "-h"], ["top", "--help"]])
def test_lazy_parser_helps_as_the_whole_one(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    said = []
    for lazy in (True, False):
        with pytest.raises(SystemExit) as exited:
            ctl_parser.build_parser(lazy=lazy).parse_args(argv)
        said.append((exited.value.code, capsys.readouterr()))
    assert said[0] == said[1] and said[0][0] == 0 and said[0][1].out.startswith("usage: tailcallctl")


def test_lazy_parser_makes_only_the_verb_it_parses() -> None:
    parser = ctl_parser.build_parser(lazy=True)
    verbs = next(a for a in parser._actions if isinstance(a, ctl_parser._Verbs)).verb_parsers
    parser.parse_args(["list"])
    made = [name for name in verbs if not isinstance(dict.__getitem__(verbs, name), ctl_parser._Unmade)]
    assert made == ["list"]


@pytest.mark.parametrize("columns", [None, "40", "0", "-3", "wide", "120"])
def test_terminal_columns_are_shutils(columns: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert ctl_parser.terminal_columns() == shutil.get_terminal_size().columns
