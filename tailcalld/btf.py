"""Facts about the running kernel read from its BTF (/sys/kernel/btf/vmlinux), for the
dispatcher: struct offsets that kernel headers of another version could get wrong."""

from __future__ import annotations

import re
import subprocess

from .dialects import BTF_VMLINUX
from .errors import ToolFailed

_STRUCT = r"^\[\d+\] STRUCT '{name}' size=\d+ vlen=\d+\n((?:\t.*\n)*)"
_MEMBER = r"^\t'{name}' type_id=\d+ bits_offset=(\d+)"


def _raw_dump() -> str:
    try:
        r = subprocess.run(["bpftool", "btf", "dump", "file", str(BTF_VMLINUX), "format", "raw"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolFailed(f"cannot run bpftool to read {BTF_VMLINUX}: {exc} (apt-get install bpftool)") from None
    if r.returncode != 0:
        raise ToolFailed(f"bpftool could not read {BTF_VMLINUX}: {r.stderr.strip()}")
    return r.stdout


def member_offset(dump: str, struct: str, member: str) -> int:
    """Byte offset of ``member`` in ``struct``, from a ``bpftool btf dump ... format raw`` text."""
    body = re.search(_STRUCT.format(name=re.escape(struct)), dump, re.MULTILINE)
    if body is None:
        raise ToolFailed(f"the kernel's BTF has no struct {struct}")
    found = re.search(_MEMBER.format(name=re.escape(member)), body.group(1), re.MULTILINE)
    if found is None:
        raise ToolFailed(f"the kernel's BTF has no member {member} in struct {struct}")
    return int(found.group(1)) // 8


def thread_info_status_offset() -> int:
    """Where ``current->thread_info.status`` (TS_COMPAT lives there on x86) is in task_struct."""
    dump = _raw_dump()
    return member_offset(dump, "task_struct", "thread_info") + member_offset(dump, "thread_info", "status")
