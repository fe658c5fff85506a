"""Reading struct offsets from a `bpftool btf dump ... format raw` text."""

from __future__ import annotations

import pytest

from tailcalld.btf import member_offset
from tailcalld.errors import ToolFailed

DUMP = """[1] INT 'long unsigned int' size=8 bits_offset=0 nr_bits=64 encoding=(none)
[114] STRUCT 'task_struct' size=3264 vlen=3
\t'thread_info' type_id=375 bits_offset=0
\t'__state' type_id=9 bits_offset=192
\t'saved_state' type_id=9 bits_offset=224
[375] STRUCT 'thread_info' size=24 vlen=4
\t'flags' type_id=1 bits_offset=0
\t'syscall_work' type_id=1 bits_offset=64
\t'status' type_id=35 bits_offset=128
\t'cpu' type_id=35 bits_offset=160
[376] STRUCT 'thread_info_x' size=8 vlen=1
\t'status' type_id=35 bits_offset=0
"""


def test_member_offsets_in_bytes() -> None:
    assert member_offset(DUMP, "thread_info", "status") == 16
    assert member_offset(DUMP, "task_struct", "saved_state") == 28
    assert member_offset(DUMP, "thread_info_x", "status") == 0  # a struct whose name extends another's


@pytest.mark.parametrize("struct,member", [("thread_inf", "status"), ("thread_info", "state"),
                                           ("task_struct", "status")])
def test_a_missing_struct_or_member_is_a_clear_error(struct: str, member: str) -> None:
    with pytest.raises(ToolFailed, match=member if struct != "thread_inf" else struct):
        member_offset(DUMP, struct, member)
