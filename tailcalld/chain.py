"""Several handlers in one slot, run in order of priority: the chain's runner and its maps.

BPF programs cannot call one another and come back, but a tail call made from a BPF-to-BPF
*subprogram* replaces only that subprogram's frame: the program it lands in returns to the
subprogram's caller.  A chained slot therefore holds a *runner*, a program of a few
instructions per link made here (no compiler), which for each link in order of priority
calls a two-line subprogram that tail-calls the link's handler, and goes on with the next
link when the handler returns 0 (or its entry is empty); any other return value (tailcalld.h's
TC_STOP) ends the chain.  The handlers need nothing of tailcalld's: a libbpf object from
elsewhere runs in a chain as it is, and lets the chain go on as long as it returns 0.

    pin_dir/chain/links     BPF_MAP_TYPE_PROG_ARRAY, MAX_LINKS entries per slot key: the handlers
    pin_dir/chain/order     array by slot key: the priority (+1, 0: none) of each of its entries
    pin_dir/chain/runners/<key>   the runner a slot runs (named tcc_<key>)

A slot with one handler holds it directly, as a slot attached without --priority does (its
entry and priority are kept all the same, so a restart knows it): the one-handler case costs
what it always did.  The chain costs a runner's tail call and a subprogram call per link.

Every change is one update the dispatcher sees whole: a link replaced is one update of its
entry; a link added or removed loads a runner for the new order and swaps it into the slot
(so a call runs the old chain or the new one, never a mix), then empties the entries no
runner reads any more.  A handler's entry never moves while it is in the chain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from . import bpfsys
from .errors import KernelError
from .pins import open_or_create_map, pin_again, pinned_programs
from .scope import insn, ld_map
from .wire_limits import MAX_LINKS

CHAIN_DIR = "chain"
RUNNERS = "runners"

_RUNNER_NAME = re.compile(r"tcc_(\d+)")
_ORDER = struct.Struct(f"<{MAX_LINKS}H")

logger = logging.getLogger("tailcalld")


# -- the runner -----------------------------------------------------------------------------------

_HELPER_TAIL_CALL = 12
_BTF_KIND_INT, _BTF_KIND_PTR, _BTF_KIND_FUNC, _BTF_KIND_FUNC_PROTO = 1, 2, 12, 13
RUNNER_FUNC, LINK_FUNC = 4, 5  # the BTF type ids of runner_btf's two functions


def runner_insns(entries: list[int], links_fd: int) -> bytes:
    """A runner that runs the handlers in ``entries`` (of the links array) in that order, until
    one returns non-zero.  Each handler has a subprogram of its own at the end, whose tail call
    has a constant key: the JIT makes it a direct jump, patched when the entry changes, where a
    key in a register costs an indirect (retpolined) one.  The kernel refuses tail calls in
    subprograms without BTF, hence ``runner_btf``."""
    mov64_reg, mov64_imm, call, exit_, jne_imm = 0xBF, 0xB7, 0x85, 0x95, 0x55
    insns = [insn(mov64_reg, 6, 1)]  # r6 = ctx, kept across the calls
    out = 1 + 3 * len(entries)  # the instruction after the links
    for i in range(len(entries)):
        at = 1 + 3 * i
        insns += [
            insn(mov64_reg, 1, 6),                              # r1 = ctx
            insn(call, 0, 1, 0, runner_subprog_offset(len(entries), i) - (at + 1) - 1),  # r0 = link_i(ctx)
            insn(jne_imm, 0, off=out - (at + 2) - 1, imm=0),    # non-zero: the chain stops
        ]
    insns += [insn(mov64_imm, 0, imm=0), insn(exit_)]
    for entry in entries:                                       # link_i(ctx):
        insns += [
            ld_map(2, links_fd),
            insn(mov64_imm, 3, imm=entry),
            insn(call, imm=_HELPER_TAIL_CALL),                  # the handler returns to our caller
            insn(mov64_imm, 0, imm=0),                          # an empty entry: go on
            insn(exit_),
        ]
    return b"".join(insns)


def runner_subprog_offset(nr_links: int, link: int) -> int:
    """Instruction index of the subprogram of the runner's ``link``-th handler (its func_info)."""
    return 1 + 3 * nr_links + 2 + 6 * link


def runner_btf() -> bytes:
    """The least BTF a runner needs: its functions, ``int runner(void *ctx)`` (type RUNNER_FUNC)
    and, for each handler's subprogram, ``static int link(void *ctx)`` (type LINK_FUNC)."""
    names = ["int", "ctx", "runner", "link"]
    strings = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    at = {n: strings.index(b"\0" + n.encode() + b"\0") + 1 for n in names}

    def kind(k: int, vlen: int = 0) -> int:
        return (k << 24) | vlen

    types = b"".join([
        struct.pack("<IIII", at["int"], kind(_BTF_KIND_INT), 4, (1 << 24) | 32),   # 1: int
        struct.pack("<III", 0, kind(_BTF_KIND_PTR), 0),                            # 2: void *
        struct.pack("<IIIII", 0, kind(_BTF_KIND_FUNC_PROTO, 1), 1, at["ctx"], 2),  # 3: int (void *ctx)
        struct.pack("<III", at["runner"], kind(_BTF_KIND_FUNC, 1), 3),             # 4: global
        struct.pack("<III", at["link"], kind(_BTF_KIND_FUNC, 0), 3),               # 5: static
    ])
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def runner_name(key: int) -> str:
    return f"tcc_{key}"


def pack_order(priorities: dict[int, int]) -> bytes:
    """A slot's ``order`` entry: position -> priority + 1 (0: the position is free)."""
    values = [0] * MAX_LINKS
    for pos, priority in priorities.items():
        values[pos] = priority + 1
    return _ORDER.pack(*values)


def unpack_order(value: bytes) -> dict[int, int]:
    """position -> priority of a slot's ``order`` entry."""
    return {pos: v - 1 for pos, v in enumerate(_ORDER.unpack(value)) if v}


# -- the pinned maps and the runners --------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    fd: int
    id: int


@dataclass
class Change:
    """What a change of one slot's chain did, until it is installed (or undone)."""

    key: int
    order: dict[int, int]  # position -> priority before the change
    filled: int | None  # the position the new handler went to (None: it was a removal)
    refilled: bool  # that position held another handler of the same priority before (now replaced)
    runner: Runner | None  # loaded for the new order; None: the slot holds a handler directly, or nothing
    slot_fd: int | None  # what the slot must hold now (None: nothing)
    keep_slot: bool = False  # the slot's runner stays: only a handler's entry was replaced


class Chains:
    """The chain maps, the runners of the chained slots and the handlers' positions, by slot
    key; the kernel side stays when this is closed."""

    def __init__(self, folder: Path, nr_keys: int) -> None:
        self._folder = folder
        self.nr_keys = nr_keys
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / RUNNERS).mkdir(mode=0o700, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._runners: dict[int, Runner] = {}
        self._orders: dict[int, dict[int, int]] = {}  # slot key -> position -> priority
        self._btf_fd = -1
        try:
            self._fds["links"] = open_or_create_map(folder / "links", bpfsys.BPF_MAP_TYPE_PROG_ARRAY,
                                                    "tailcalld_links", 4, 4, MAX_LINKS * nr_keys)
            self._fds["order"] = open_or_create_map(folder / "order", bpfsys.BPF_MAP_TYPE_ARRAY,
                                                    "tailcalld_order", 4, _ORDER.size, nr_keys)
            self._orders = self._read_orders()
            self._runners = self._pinned_runners()
            self._btf_fd = bpfsys.btf_load(runner_btf())
        except BaseException:
            self.close()
            raise

    def _read_orders(self) -> dict[int, dict[int, int]]:
        orders = {}
        for key, value in enumerate(bpfsys.array_values(self._fds["order"], self.nr_keys, _ORDER.size)):
            order = unpack_order(value)
            if order:
                orders[key] = order
        return orders

    def _pinned_runners(self) -> dict[int, Runner]:
        """The runners a previous run pinned, by slot key."""
        found = pinned_programs(self._folder / RUNNERS, _RUNNER_NAME, "a chain runner of tailcalld's")
        return {key: Runner(fd, prog_id) for key, (fd, prog_id, _) in found.items()}

    # -- what the kernel holds ----------------------------------------------------------------------

    def chained(self) -> dict[int, dict[int, int | None]]:
        """slot key -> priority -> the id of the program in its entry (None: empty), for every
        slot with a handler given a priority."""
        return {key: {priority: bpfsys.prog_array_get(self._fds["links"], MAX_LINKS * key + pos)
                      for pos, priority in sorted(order.items(), key=lambda item: item[1])}
                for key, order in self._orders.items()}

    def slots(self) -> list[int]:
        """The keys of the slots with a handler given a priority (no map read)."""
        return list(self._orders)

    def link(self, key: int, priority: int) -> int | None:
        pos = self._position(key, priority)
        return None if pos is None else bpfsys.prog_array_get(self._fds["links"], MAX_LINKS * key + pos)

    def runner(self, key: int) -> Runner | None:
        return self._runners.get(key)

    def priorities(self, key: int) -> list[int]:
        return sorted(self._orders.get(key, {}).values())

    def _position(self, key: int, priority: int) -> int | None:
        return next((pos for pos, p in self._orders.get(key, {}).items() if p == priority), None)

    # -- changes ------------------------------------------------------------------------------------

    def put(self, key: int, priority: int, prog_fd: int) -> Change:
        """Put ``prog_fd`` in slot ``key``'s chain at ``priority`` (replacing the handler there),
        and make what the slot must hold for it: the handler itself when it is the only one,
        else a runner for the new order.  Nothing the dispatcher reads is changed except a
        replaced handler's entry (one update, as a plain slot's).  Raises KernelError."""
        order = dict(self._orders.get(key, {}))
        pos = self._position(key, priority)
        refilled = pos is not None
        if pos is None:
            free = [p for p in range(MAX_LINKS) if p not in order]
            if not free:
                raise KernelError(f"slot {key}: a chain holds at most {MAX_LINKS} handlers")
            pos = free[0]
        new_order = {**order, pos: priority}
        try:
            bpfsys.prog_array_set(self._fds["links"], MAX_LINKS * key + pos, prog_fd)
        except OSError as exc:
            raise KernelError(f"slot {key}: the handler could not be put in the chain: {exc.strerror}") from None
        change = Change(key, order, pos, refilled, None, prog_fd)
        if refilled and len(new_order) > 1 and key in self._runners:
            change.keep_slot = True  # the running runner reads that entry: nothing else changes
        elif len(new_order) > 1:
            try:
                change.runner = self._load_runner(key, new_order)
            except BaseException:
                self._undo_fill(change)
                raise
            change.slot_fd = change.runner.fd
        self._commit_order(change, new_order)
        return change

    def remove(self, key: int, priority: int, lone_fd: int | None) -> Change | None:
        """Take the handler at ``priority`` out of slot ``key``'s chain: what the slot must hold
        then (``lone_fd``: an fd of the one handler left, if there is one and we hold it; without
        it that one keeps running behind a runner).  None when there is no such handler."""
        order = dict(self._orders.get(key, {}))
        pos = self._position(key, priority)
        if pos is None:
            return None
        new_order = {p: prio for p, prio in order.items() if p != pos}
        change = Change(key, order, None, False, None, None)
        if len(new_order) > 1 or (len(new_order) == 1 and lone_fd is None):
            change.runner = self._load_runner(key, new_order)
            change.slot_fd = change.runner.fd
        elif new_order:
            change.slot_fd = lone_fd
        self._commit_order(change, new_order)
        return change

    def _commit_order(self, change: Change, order: dict[int, int]) -> None:
        """Write slot ``change.key``'s new order (pinned, and ours); on a failure the change is
        undone and KernelError raised."""
        try:
            self._write_order(change.key, order)
        except KernelError:
            self.undo(change)
            raise
        if order:
            self._orders[change.key] = order
        else:
            self._orders.pop(change.key, None)

    def renew(self, key: int) -> Change | None:
        """A runner for slot ``key``'s order as ``order`` says it, to be put in the slot: a start
        makes one for each chained slot, so a runner that a crash left one change behind its
        order (the order is written just before the slot's update) runs what the order says.
        None when the slot has no runner."""
        order = self._orders.get(key)
        if key not in self._runners or not order:
            return None
        runner = self._load_runner(key, order)
        return Change(key, dict(order), None, False, runner, runner.fd)

    def installed(self, change: Change) -> None:
        """The slot holds what ``change`` made for it: pin its runner (or drop the old one),
        and empty the entries no runner reads any more."""
        key = change.key
        if change.keep_slot:
            return
        old = self._runners.pop(key, None)
        path = self._folder / RUNNERS / str(key)
        if change.runner is not None or old is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if change.runner is not None:
            try:
                bpfsys.obj_pin(change.runner.fd, str(path))
            except OSError as exc:
                logger.warning("the chain runner of slot %d could not be pinned (%s): a restart will not see "
                               "its chain", key, exc)
            self._runners[key] = change.runner
        if old is not None and (change.runner is None or old.id != change.runner.id):
            os.close(old.fd)
        now = self._orders.get(key, {})
        for pos in change.order:
            if pos not in now:
                self._empty(MAX_LINKS * key + pos)

    def undo(self, change: Change) -> None:
        """A change the slot could not take: the order as it was, its runner dropped, the entry
        it filled emptied (a replaced handler's entry keeps the new one: it cannot be put back)."""
        if change.runner is not None and change.runner is not self._runners.get(change.key):
            os.close(change.runner.fd)  # made for the change (not the running one it kept)
        self._undo_fill(change)
        with contextlib.suppress(KernelError):
            self._write_order(change.key, change.order)
        if change.order:
            self._orders[change.key] = change.order
        else:
            self._orders.pop(change.key, None)

    def _undo_fill(self, change: Change) -> None:
        if change.filled is not None and not change.refilled:
            self._empty(MAX_LINKS * change.key + change.filled)

    def forget(self, key: int) -> None:
        """Slot ``key`` holds no chain any more (emptied, or a handler attached without a
        priority took it): its entries, order and runner go."""
        for pos in self._orders.pop(key, {}):
            self._empty(MAX_LINKS * key + pos)
        with contextlib.suppress(OSError):
            self._write_order(key, {})
        runner = self._runners.pop(key, None)
        if runner is not None:
            os.close(runner.fd)
        with contextlib.suppress(FileNotFoundError):
            (self._folder / RUNNERS / str(key)).unlink()

    def _load_runner(self, key: int, order: dict[int, int]) -> Runner:
        entries = [MAX_LINKS * key + pos for pos, _ in sorted(order.items(), key=lambda item: item[1])]
        insns = runner_insns(entries, self._fds["links"])
        funcs = [(0, RUNNER_FUNC)] + [(runner_subprog_offset(len(entries), i), LINK_FUNC) for i in range(len(entries))]
        fd, log = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, runner_name(key), b"GPL", insns, 1 << 16,
                                   self._btf_fd, funcs)
        if fd < 0:
            raise KernelError(f"slot {key}: the chain runner was refused: {os.strerror(-fd)}\n{log}")
        return Runner(fd, bpfsys.prog_info(fd).id)

    def _write_order(self, key: int, order: dict[int, int]) -> None:
        try:
            bpfsys.array_fill(self._fds["order"], key, pack_order(order))
        except OSError as exc:
            raise KernelError(f"slot {key}: the chain's order could not be written: {exc.strerror}") from None

    def _empty(self, entry: int) -> None:
        try:
            bpfsys.map_delete(self._fds["links"], entry)
        except OSError as exc:
            logger.warning("entry %d of the chain's handlers could not be emptied: %s", entry, exc)

    def restore_pins(self) -> list[str]:
        """Pin again the chain's maps and runners if someone unpinned them (``rm -rf pin_dir``).
        Raises as ``pins.pin_again`` does."""
        self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self._folder / RUNNERS).mkdir(mode=0o700, exist_ok=True)
        return (pin_again(self._folder, self._fds)
                + pin_again(self._folder / RUNNERS, {str(key): r.fd for key, r in self._runners.items()}))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for runner in self._runners.values():
            os.close(runner.fd)
        self._runners.clear()
        if self._btf_fd >= 0:
            os.close(self._btf_fd)
            self._btf_fd = -1
