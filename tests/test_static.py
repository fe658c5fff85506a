"""The code's own checks: types (mypy, every function annotated) and lint (ruff)."""

from __future__ import annotations

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
