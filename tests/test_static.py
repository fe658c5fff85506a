"""The code's own checks: types (mypy, every function annotated) and lint (ruff)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_types() -> None:
    r = subprocess.run([str(BIN / "mypy"), "tailcalld"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lint() -> None:
    r = subprocess.run([str(BIN / "ruff"), "check", "tailcalld", "tests", "bench"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_nothing_is_opened_by_id() -> None:
    """Opening a BPF object by id, or walking ids, needs CAP_SYS_ADMIN, which the unit does not
    give the daemon (README, "Privileges"): tailcalld reaches its objects through pins and fds."""
    by_id = re.compile(r"_get_fd_by_id|_get_next_id")  # libbpf's names: bpf_prog_get_fd_by_id, ...
    found = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "tailcalld").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if by_id.search(line)]
    assert found == []
