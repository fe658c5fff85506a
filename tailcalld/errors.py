"""Errors inside tailcalld, each with the stable code it carries on the wire.

Inside the daemon these are exceptions; at the protocol edge they become
``{"code": ..., "message": ..., "details": ...}``.  The code is a class attribute, so it is
written once, here: everyone else (the compile worker, tailcallctl) names the class.

Expected failures (bad input, a host that lacks something, a kernel that refuses) each have
a class of their own.  Anything that is not a ``TailcalldError`` is a bug and goes out as
``internal``.
"""

from __future__ import annotations

# Only annotations use typing: tailcallctl imports this module, and typing is a cost at its start.
TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any, ClassVar


class TailcalldError(Exception):
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(TailcalldError):
    code = "bad_request"


class RequestTooLarge(TailcalldError):
    code = "request_too_large"


class SourceTooLarge(TailcalldError):
    code = "source_too_large"


class UnknownCommand(TailcalldError):
    code = "unknown_command"


class SlotOutOfRange(TailcalldError):
    code = "slot_out_of_range"


class UnknownSyscall(TailcalldError):
    code = "unknown_syscall"


class SlotEmpty(TailcalldError):
    code = "slot_empty"


class ForbiddenInclude(TailcalldError):
    """A source tried to #include a file outside the kernel/BPF headers."""
    code = "forbidden_include"


class CompileError(TailcalldError):
    """clang refused the source; details carry its diagnostics."""
    code = "compile_error"


class VerifierRejected(TailcalldError):
    """The kernel refused the program; details carry the verifier log."""
    code = "verifier_rejected"


class FunctionNotFound(TailcalldError):
    code = "function_not_found"


class FunctionAmbiguous(TailcalldError):
    code = "function_ambiguous"


class WrongProgramType(TailcalldError):
    """The chosen program is of a type the raw_tp dispatcher cannot tail-call."""
    code = "wrong_program_type"


class ObjectError(TailcalldError):
    code = "object_error"


class InvalidSetting(TailcalldError):
    """A --set the handler cannot take: no such global variable (the settable ones are in
    details["candidates"]), a type --set cannot write, or a value out of its range."""
    code = "invalid_setting"


class CompileTimeout(TailcalldError):
    code = "compile_timeout"


class CompileOutOfMemory(TailcalldError):
    """The compile went past ``compile_memory_max`` (a macro nest, say) and was stopped."""
    code = "compile_out_of_memory"


class CompilerCrashed(TailcalldError):
    """The compile worker died without a result (a crash in bcc or clang); details carry its
    output and exit status."""
    code = "compiler_crashed"


class MapTooLarge(TailcalldError):
    """The handler's maps would take more than ``max_map_bytes``."""
    code = "map_too_large"


class MapError(TailcalldError):
    """The kernel refused to create one of the handler's maps (before any program was verified)."""
    code = "map_error"


class KernelError(TailcalldError):
    """A bpf() call failed where it should not have (map update, pin, attach)."""
    code = "kernel_error"


class PinConflict(TailcalldError):
    """Something at a pin path is not what tailcalld would have put there."""
    code = "pin_conflict"


class AlreadyRunning(TailcalldError):
    code = "already_running"


class PermissionDenied(TailcalldError):
    code = "permission_denied"


class TooManyConnections(TailcalldError):
    code = "too_many_connections"


class Unloading(TailcalldError):
    code = "unloading"


class DeadlinePassed(TailcalldError):
    """attach --until a time already past: the attach would end before it began."""
    code = "deadline_passed"


class Conflict(TailcalldError):
    """attach or detach with --expect: the slot holds another program than the one expected (or
    one where it was expected empty).  details: slot, hook, expected, current (None: empty)."""
    code = "conflict"


class BadCgroup(TailcalldError):
    """attach --cgroup PATH: the path names no cgroup v2 folder.  details: cgroup (and, when
    the path is on no cgroup v2 hierarchy, cgroup2_mounts: where there is one)."""
    code = "bad_cgroup"


class PriorityClash(TailcalldError):
    """attach --priority: the priority is taken by another handler, the slot holds a handler
    attached without a priority (or, attaching without one, several with one), or the slot's
    chain is full; detach without --priority of a slot that runs several.  details: slot,
    hook, priority, priorities (those the slot's handlers have)."""
    code = "priority_clash"


class ConfigError(TailcalldError):
    code = "config_error"


class NoBpffs(TailcalldError):
    """The pin folder is not on a BPF filesystem (bpffs not mounted)."""
    code = "no_bpffs"


class ToolFailed(TailcalldError):
    """A helper program tailcalld runs (bpftool, to make vmlinux.h) failed or is missing."""
    code = "tool_failed"


class StateUnwritable(TailcalldError):
    """The saved state could not be written (a full or read-only disk, say)."""
    code = "state_unwritable"


class UnsafePath(TailcalldError):
    """A folder tailcalld trusts (state_dir, the socket's folder, pin_dir) could be changed by
    someone other than root: wrong owner, group/world-writable, a symbolic link, not a folder."""
    code = "unsafe_path"


class EventsUnavailable(TailcalldError):
    """This daemon has no event channel to read."""
    code = "events_unavailable"


class TimingUnavailable(TailcalldError):
    """Handler timing could not be switched on (no BPF trampoline for the dispatcher here)."""
    code = "timing_unavailable"


class ApplyIncomplete(TailcalldError):
    """An apply stopped part-way through switching slots: those switched stay switched."""
    code = "apply_incomplete"


class RequestError(Exception):
    """A request that failed before it could run, with the id its reply must echo."""

    def __init__(self, request_id: int | str | None, error: TailcalldError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


def _all_codes() -> dict[str, type[TailcalldError]]:
    found: dict[str, type[TailcalldError]] = {}
    pending: list[type[TailcalldError]] = [TailcalldError]
    while pending:
        cls = pending.pop()
        found[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return found


def error_class(code: str) -> type[TailcalldError]:
    """The class of a code that crossed a process boundary (the compile worker's result); an
    unknown code is a bug, so it maps to the generic class (``internal``)."""
    return _all_codes().get(code, TailcalldError)
