"""The control protocol: newline-delimited JSON over a Unix stream socket.

These pydantic models are the only definition of the wire format; the server, the
client and the tests all go through them.

    request:  {"id": 1, "command": "attach", "slot": "fchmodat", "source": "...", ...}
    reply:    {"id": 1, "ok": true, "result": {...}}
          or  {"id": 1, "ok": false, "error": {"code": "...", "message": "...", "details": ...}}
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator, model_validator)

from .dialects import MAX_HEADER_NAME, header_name_problem
from .errors import BadRequest, RequestError, TailcalldError, UnknownCommand
from .loader_settings import IDENTIFIER, MAX_SETTINGS, MAX_VALUE_CHARS, check_define
# The bounds on a handler (their own module: tailcallctl reads them without pydantic).
from .wire_limits import MAX_HEADERS, MAX_HEADERS_BYTES, MAX_OBJECT_CHARS, MAX_PRIORITY, MAX_SOURCE_CHARS  # noqa: F401

RequestId = StrictInt | StrictStr | None
Slot = Annotated[StrictInt | StrictStr, Field(description="syscall number or name, e.g. 268 or 'fchmodat'")]


def _header_name(name: str) -> str:
    problem = header_name_problem(name)
    if problem is not None:
        raise ValueError(f"header name {name[:MAX_HEADER_NAME]!r} is not allowed: {problem}")
    return name


HeaderName = Annotated[StrictStr, Field(max_length=MAX_HEADER_NAME), AfterValidator(_header_name)]
SettingName = Annotated[StrictStr, Field(pattern=f"^{IDENTIFIER.pattern}$", description="a C identifier")]
# Numbers may come as JSON numbers; each is read as its variable's type (commands: as text).
SettingValue = Annotated[StrictStr, Field(max_length=MAX_VALUE_CHARS)] | StrictInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: RequestId = None


class PingRequest(_Request):
    command: Literal["ping"]


class HandlerFile(BaseModel):
    """A handler's file as the client sends it: C source text (with the local headers it
    includes), or a BPF ELF object in base64."""

    model_config = ConfigDict(extra="forbid")
    source: Annotated[StrictStr, Field(min_length=1, max_length=MAX_SOURCE_CHARS)] | None = None
    object: Annotated[StrictStr, Field(min_length=1, max_length=MAX_OBJECT_CHARS,
                                       description="a BPF ELF object (.o), base64")] | None = None
    filename: Annotated[StrictStr, Field(max_length=4096)] = "<source>"
    headers: Annotated[dict[HeaderName, Annotated[StrictStr, Field(max_length=MAX_SOURCE_CHARS)]],
                       Field(max_length=MAX_HEADERS)] | None = Field(
        None, description='local headers the source includes in quotes, by the name it includes them by: '
                          '{"syscount.h": "text", "sub/x.h": "text"}; compiled beside it')

    @model_validator(mode="after")
    def _one_of_source_or_object(self) -> Self:
        if (self.source is None) == (self.object is None):
            raise ValueError("give exactly one of source (C text) or object (base64 ELF)")
        if self.headers and self.object is not None:
            raise ValueError("headers go with a source; an object is compiled already")
        return self


class HandlerOptions(BaseModel):
    """How a handler's file is made into its program: the function, the dialect, the loader's settings."""

    model_config = ConfigDict(extra="forbid")
    dialect: Literal["auto", "bcc", "libbpf"] = Field(
        "auto", description="C dialect of `source`; auto: SEC(), vmlinux.h or bpf/bpf_helpers.h mean libbpf")
    function: Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] | None = None
    variables: Annotated[dict[SettingName, SettingValue], Field(max_length=MAX_SETTINGS)] = Field(
        default_factory=dict, description="--set: global variables of a libbpf handler (.rodata, .data, .bss), "
                                          "written before the load; a value is read as its variable's type")
    defines: Annotated[dict[SettingName, StrictStr], Field(max_length=MAX_SETTINGS)] = Field(
        default_factory=dict, description="-D: macros for the compile of C source, NAME -> one-line VALUE")

    @field_validator("defines")
    @classmethod
    def _one_line_defines(cls, defines: dict[str, str]) -> dict[str, str]:
        for name, value in defines.items():
            check_define(name, value)
        return defines


class _HandlerSpec(HandlerFile, HandlerOptions, _Request):
    """A handler as the client sends it: its file and how to make it into a program."""


HookField = Literal["enter", "exit"]
MAX_ATTACH_SECONDS = 366 * 86400  # attach --for: a year at most (a slip of units is caught)
# Compare-and-swap: the change is made only if the slot still holds this program (its id), or
# nothing ("empty"); else the request fails with `conflict`, naming the program it holds.
Expect = Annotated[StrictInt, Field(ge=1)] | Literal["empty"]
_EXPECT_HELP = ("change the slot only if it holds this program (id) or nothing ('empty'), checked under the "
                "slot's lock; else error conflict with details.current")
Priority = Annotated[StrictInt, Field(ge=0, le=MAX_PRIORITY)]
_PRIORITY_HELP = ("one of several handlers of the slot, run in order of priority, lowest first (0..999); each "
                  "can end the chain by returning non-zero (TC_STOP); None: the slot's only handler")
_HOOK_HELP = ("enter: on sys_enter, the handler sees the arguments; exit: on sys_exit, it sees the return "
              "value (ctx->args[1])")


class AttachRequest(_HandlerSpec):
    command: Literal["attach"]
    slot: Slot
    hook: HookField = Field("enter", description=_HOOK_HELP)
    fresh: StrictBool = Field(False, description="compile anew even if a slot already runs the same handler "
                                                 "(by default that program is reused, maps included)")
    journal: StrictBool = Field(False, description="write the slot's events (TC_PRINTF, TC_EMIT) to the journal "
                                                   "too, at most events_journal_rate per second")
    expect: Expect | None = Field(None, description=_EXPECT_HELP)
    # An attach that ends: the slot goes back to what it held before (also after a stop or reboot).
    for_seconds: Annotated[float, Field(gt=0, le=MAX_ATTACH_SECONDS, strict=True)] | None = Field(
        None, description="the handler stays this many seconds, then the slot goes back to what it held before")
    until: AwareDatetime | None = Field(None, description="as for_seconds, until this time (ISO 8601 with its offset)")
    cgroup: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="run the handler only for tasks in this cgroup v2 folder's subtree (an absolute path, "
                          "e.g. /sys/fs/cgroup/system.slice/nginx.service); other tasks' calls count as scope_misses")
    priority: Priority | None = Field(None, description=_PRIORITY_HELP)

    @model_validator(mode="after")
    def _one_deadline(self) -> Self:
        if self.for_seconds is not None and self.until is not None:
            raise ValueError("give for_seconds or until, not both")
        return self


class CheckRequest(_HandlerSpec):
    """Compile and load for verification only; nothing is attached."""
    command: Literal["check"]


class DetachRequest(_Request):
    command: Literal["detach"]
    slot: Slot
    hook: HookField = "enter"
    expect: Expect | None = Field(None, description=_EXPECT_HELP)
    priority: Priority | None = Field(None, description="the handler of that priority in a slot that runs several; "
                                                        "the others stay")


class ListRequest(_Request):
    command: Literal["list"]


class ShowRequest(_Request):
    """One slot in full: its record, the maps its program uses, the handler's saved source."""
    command: Literal["show"]
    slot: Slot
    hook: HookField = "enter"
    priority: Priority | None = Field(None, description="the handler of that priority, in a slot that runs several; "
                                                        "None: its only handler, or its first")


class StatusRequest(_Request):
    command: Literal["status"]


class SyscallsRequest(_Request):
    """This machine's syscall numbers and names (ia32 ones too on x86_64), each with its slot."""
    command: Literal["syscalls"]
    pattern: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = Field(
        None, description="a shell pattern on names ('open*'), or a number; None: every syscall")


class TimingRequest(_Request):
    """Time the handlers for at least ``seconds`` more (a lease: top renews it); 0 only asks."""
    command: Literal["timing"]
    seconds: Annotated[float, Field(ge=0, le=600)] = 10.0


class EventsRequest(_Request):
    """The handlers' latest events (TC_PRINTF, TC_EMIT); with ``follow``, the reply is followed on
    the same connection by EventStream lines (one event or notice each) until the client closes it."""
    command: Literal["events"]
    slot: Slot | None = Field(None, description="only this syscall's events; None: every slot's")
    hook: HookField = Field("enter", description="with slot: its enter or its exit slot")
    follow: StrictBool = Field(False, description="keep the connection open and stream new events")
    last: Annotated[StrictInt, Field(ge=0, le=1_000_000)] | None = Field(
        None, description="at most this many of the latest events in the reply; None: all kept "
                          "(events_backlog), or 10 with follow")


class UnloadAllRequest(_Request):
    """Empty every slot, remove the dispatcher and every pin, forget the state, then exit."""
    command: Literal["unload-all"]


# The most slot entries one apply may list: every enter and every exit slot of a 1024-slot table.
MAX_APPLY_SLOTS = 2048


class DesiredSlot(HandlerOptions):
    """One slot of an apply: which handler (``file``, an index into ApplyRequest.files) and how."""

    slot: Slot
    hook: HookField = Field("enter", description=_HOOK_HELP)
    file: Annotated[StrictInt, Field(ge=0, description="index of its file in `files`")]
    journal: StrictBool = Field(False, description="write the slot's events to the journal too")
    cgroup: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="as attach's cgroup: the handler runs for this cgroup v2 subtree's tasks only")
    priority: Priority | None = Field(None, description="as attach's priority: one of the slot's handlers, run in "
                                                        "order, lowest first")


class ApplyRequest(_Request):
    """Make the slots match ``slots``: fill or replace each one listed, empty every other.  A file
    several slots use is sent once.  Every new handler is built before any slot changes."""
    command: Literal["apply"]
    files: Annotated[list[HandlerFile], Field(max_length=MAX_APPLY_SLOTS)]
    slots: Annotated[list[DesiredSlot], Field(max_length=MAX_APPLY_SLOTS)]
    dry_run: StrictBool = Field(False, description="only say what would change (nothing is compiled)")
    atomic: StrictBool = Field(False, description="every slot switches at one instant as every syscall sees it (no "
                                                  "call sees some slots changed and others not), and nothing changes "
                                                  "if any step fails, the kernel's included")
    source: Annotated[StrictStr, Field(max_length=4096)] = Field(
        "<apply>", description="where the slots were read from (the apply file's path), for messages and the journal")

    @model_validator(mode="after")
    def _files_exist(self) -> Self:
        for i, slot in enumerate(self.slots):
            if slot.file >= len(self.files):
                raise ValueError(f"slot entry {i} names file {slot.file}; there are {len(self.files)}")
        return self


class SaveRequest(_Request):
    """The running slots with their handlers' files: what `tailcallctl save` writes."""
    command: Literal["save"]


Request = Annotated[PingRequest | AttachRequest | CheckRequest | DetachRequest | ListRequest | StatusRequest
                    | SyscallsRequest | TimingRequest | EventsRequest | UnloadAllRequest | ApplyRequest | SaveRequest
                    | ShowRequest,
                    Field(discriminator="command")]
COMMANDS = ("ping", "attach", "check", "detach", "list", "status", "syscalls", "timing", "events", "unload-all",
            "apply", "save", "show")
_request_adapter: TypeAdapter[Request] = TypeAdapter(Request)


# Results ---------------------------------------------------------------------------------

class PingResult(BaseModel):
    version: str
    pid: int


class SlotInfo(BaseModel):
    slot: int
    syscall: str
    function: str | None = Field(description="handler function; None when adopted from pins unknown to us")
    dialect: Literal["bcc", "libbpf", "object"] | None = None
    prog_id: int
    filename: str | None
    source_sha256: str | None
    attached_at: datetime | None
    attached_by_uid: int | None = None
    hook: HookField = Field("enter", description=_HOOK_HELP)
    journal: bool = Field(False, description="its events go to the journal too (attach --journal)")
    variables: dict[str, str] = Field(default_factory=dict, description="the --set it was attached with")
    defines: dict[str, str] = Field(default_factory=dict, description="the -D it was attached with")
    expires_at: datetime | None = Field(None, description="attach --for/--until: when the slot goes back to "
                                                          "what it held before; None: it stays")
    cgroup: str | None = Field(None, description="attach --cgroup: the handler runs only for tasks in this cgroup "
                                                 "v2 subtree; None: for every task")
    priority: int | None = Field(None, description="attach --priority: its place among the slot's handlers, which "
                                                   "run lowest first (hits are the slot's); None: the slot's only one")
    # Keep these last, in this order: commands.ListCache serialises the rest once per record
    # and writes only these per request.
    state: Literal["in-sync", "kernel-empty", "kernel-other", "not-restored", "restoring"] = Field(
        "in-sync", description="the kernel's slot compared with what tailcalld wants there; not-restored: the "
                               "recorded handler could not be rebuilt at start (retried at the next start); "
                               "restoring: the start is rebuilding it now (a change of the slot waits for it)")
    kernel_prog_id: int | None = Field(None, description="the program the kernel's slot holds now")
    hits: int = Field(0, description="times the slot's handler ran since the daemon started")
    misses: int = Field(description="tail-call misses of this slot since the daemon started")
    scope_misses: int = Field(0, description="calls of tasks outside the slot's cgroup (attach --cgroup) since "
                                             "the daemon started: the handler did not run for them")
    timed_runs: int | None = Field(None, description="handler runs timed since timing was switched on; "
                                                     "None: timing is off (see the timing command)")
    timed_ns: int | None = Field(None, description="their nanoseconds, dispatcher entry to handler return")
    events_emitted: int = Field(0, description="TC_PRINTF/TC_EMIT calls of handlers in this slot, ever (pinned "
                                               "counters)")
    events_lost: int = Field(0, description="of them, lost in the kernel: the ring buffer was full")
    events_delivered: int = Field(0, description="of them, read by this daemon since it started")


class EventRecord(BaseModel):
    """One event a handler sent (the daemon writes these by hand, in this shape: events.py)."""
    time_ns: int = Field(description="when, in nanoseconds since the epoch")
    slot: int = Field(description="the syscall number")
    hook: HookField
    syscall: str
    pid: int
    tid: int
    uid: int
    comm: str
    compat: bool = Field(False, description="the caller was a 32-bit program")
    message: str | None = Field(None, description="TC_PRINTF: the formatted line")
    fields: Any = Field(None, description="TC_EMIT: the struct's fields, decoded from the handler's BTF; "
                                          '{"bytes": hex} when the type is unknown (bcc)')


class EventsResult(BaseModel):
    events: list[EventRecord]
    following: bool = Field(description="EventStream lines follow on this connection")


class EventsDropped(BaseModel):
    """Events this client did not get because it did not read fast enough."""
    dropped: int
    where: Literal["daemon"]
    reason: str


class EventsLost(BaseModel):
    """Events a slot's handler could not send: the kernel's ring buffer was full."""
    lost: int
    slot: int
    hook: HookField
    syscall: str
    where: Literal["kernel"]
    reason: str


# What follows an events reply with following=true: one of these per line (an EventRecord, or
# a notice of what this client missed), until the client closes the connection.
EventStream = EventRecord | EventsDropped | EventsLost


class AttachResult(BaseModel):
    slot: int
    syscall: str
    function: str
    prog_id: int
    insns: int
    replaced_prog_id: int | None
    hook: HookField = "enter"
    priority: int | None = None
    log: str = Field("", description="the compiler's warnings and the loader's messages, if any")
    warnings: list[str] = Field(default_factory=list, description="tailcalld's own warnings about the handler "
                                                                  "(kernel headers that do not match the kernel)")
    unchanged: bool = Field(False, description="the slot already ran this very handler: nothing was done "
                                               "(prog_id is that program)")


class CheckResult(BaseModel):
    function: str
    dialect: Literal["bcc", "libbpf", "object"]
    prog_type: str
    insns: int = Field(description="instructions of the verified program, as the kernel translated it")
    log: str = Field("", description="compiler and loader warnings")
    warnings: list[str] = Field(default_factory=list, description="tailcalld's own warnings about the handler")


class DetachResult(BaseModel):
    slot: int
    syscall: str
    prog_id: int
    hook: HookField = "enter"
    priority: int | None = None


class ListResult(BaseModel):
    slots: list[SlotInfo]


class MapEntry(BaseModel):
    """A map the slot's program uses, as bpftool map show names it."""
    id: int
    name: str | None = Field(None, description="None, as the fields below: known by its id alone (tailcalld "
                                               "opens no map by id)")
    type: str | None = Field(None, description="hash, array, percpu_array, ringbuf, ... (the kernel's map type)")
    key_size: int | None = None
    value_size: int | None = None
    max_entries: int | None = None


class ShowResult(BaseModel):
    slot: SlotInfo = Field(description="the slot's entry, as list has it")
    maps: list[MapEntry] = Field(description="the maps its program uses: the kernel's ids now")
    maps_note: str | None = Field(None, description="when the maps are not the kernel's word now: why, and "
                                                    "where they come from")
    source: str | None = Field(description="the handler's C source as saved (state_dir/sources); None for an "
                                           "object or a program of unknown source")
    object_bytes: int | None = Field(None, description="the saved object's size, when the handler is a .o")
    headers: dict[str, str] = Field(default_factory=dict, description="its local headers, by the name the "
                                                                      "source includes them by")
    priorities: list[int] = Field(default_factory=list, description="the priorities of the slot's handlers, when "
                                                                    "it runs them in order (attach --priority)")


class StatusResult(BaseModel):
    version: str
    pid: int
    started_at: datetime
    pin_dir: str
    socket: str
    dispatcher_prog_id: int
    dispatcher_link_id: int
    adopted: bool = Field(description="the dispatcher was already pinned and was adopted, not loaded")
    upgraded_from: int | None = Field(None, description="program id of the older dispatcher this start replaced")
    slots_used: int
    nr_slots: int
    restoring: int = Field(0, description="slots the start is still rebuilding (after a reboot: compiles, or loads "
                                          "from the compile cache); list shows them as restoring")
    next_expiry: datetime | None = Field(None, description="the earliest end of an attach --for/--until (list: the "
                                                           "expires_at of each such slot); None: none")
    scoped: int = Field(0, description="slots whose handler runs for one cgroup only (attach --cgroup)")
    chained: int = Field(0, description="slots whose handlers run in order of priority (attach --priority)")
    atomic_applies: int = Field(0, description="apply --atomic changes made since the daemon started")
    hits_total: int = Field(0, description="handler runs on all slots since the daemon started")
    misses_total: int = Field(description="tail-call misses on all slots since the daemon started")
    miss_log_interval: float
    connections: int = Field(0, description="control connections open now, this one included")
    timing_seconds_left: float = Field(0.0, description="handler timing stays on this long (0: off)")
    corrections: list[str] = Field(default_factory=list,
                                   description="what the start-up reconcile changed to make kernel and state agree")
    events_emitted: int = Field(0, description="TC_PRINTF/TC_EMIT calls of all handlers, ever (pinned counters)")
    events_lost: int = Field(0, description="of them, lost in the kernel: the ring buffer was full")
    events_delivered: int = Field(0, description="events this daemon read from the ring buffer since it started")
    events_subscribers: int = Field(0, description="`tailcallctl events -f` clients now")
    events_buffer_bytes: int = Field(0, description="size of the event ring buffer")


class TimingResult(BaseModel):
    on: bool
    seconds_left: float = Field(description="how long timing stays on unless someone renews it")
    dispatch_ns: float | None = Field(None, description="mean time of a call that fell through (the "
                                                        "dispatcher's share of every timed run)")


class SyscallEntry(BaseModel):
    abi: str = Field(description="the machine's own ABI (x86_64, aarch64, ...) or ia32 for 32-bit callers")
    nr: int
    name: str
    slot: int | None = Field(description="the slot its calls are dispatched to; None: never dispatched")
    prog_id: int | None = Field(description="the handler program in that slot now, as tailcalld records it")
    function: str | None


class SyscallsResult(BaseModel):
    syscalls: list[SyscallEntry]


class UnloadResult(BaseModel):
    slots_emptied: list[int]
    pins_removed: list[str]


ApplyAction = Literal["add", "replace", "remove", "unchanged"]


class SlotChange(BaseModel):
    """What an apply did (or, dry, would do) to one slot."""
    action: ApplyAction
    slot: int
    syscall: str
    hook: HookField = "enter"
    priority: int | None = Field(None, description="the handler's priority, in a slot that runs several")
    index: int | None = Field(description="the slot's entry in the request (the apply file's [[slot]] table, "
                                           "from 0); None for a removal")
    function: str | None = Field(description="the handler the slot runs after the apply (for a removal: ran); "
                                             "None: not known before it is built (a dry run without --function)")
    filename: str | None
    prog_id: int | None = Field(description="the program the slot runs after the apply; None: dry run, or removed")
    replaced_prog_id: int | None = Field(None, description="the program the slot ran before (replace, remove)")
    replaced_function: str | None = None
    replaced_filename: str | None = None
    why: list[str] = Field(default_factory=list, description="replace: what differs (source, function, dialect, "
                                                             "variables, defines, journal, kernel)")
    log: str = Field("", description="the compiler's warnings and the loader's messages, if any")
    warnings: list[str] = Field(default_factory=list)


class ApplyResult(BaseModel):
    dry_run: bool
    changes: list[SlotChange] = Field(description="one per slot listed or emptied, in the order applied: "
                                                  "adds and replaces by slot, then removals")

    @property
    def changed(self) -> bool:
        return any(c.action != "unchanged" for c in self.changes)


class SavedFile(BaseModel):
    """A handler file of the running set, once however many slots run it."""
    sha256: str
    filename: str | None
    source: str | None = None
    object: str | None = Field(None, description="base64")
    headers: dict[str, str] = Field(default_factory=dict)


class SavedSlot(BaseModel):
    slot: int
    syscall: str
    hook: HookField = "enter"
    function: str | None
    dialect: Literal["bcc", "libbpf", "object"] | None
    filename: str | None
    journal: bool = False
    cgroup: str | None = None
    priority: int | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    defines: dict[str, str] = Field(default_factory=dict)
    prog_id: int
    file: int | None = Field(description="index of its file in `files`; None: its source is unknown (a program "
                                         "adopted from the kernel), so it cannot be saved")


class SaveResult(BaseModel):
    slots: list[SavedSlot]
    files: list[SavedFile]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class OkResponse(BaseModel):
    id: RequestId
    ok: Literal[True] = True
    result: dict[str, Any]


class ErrorResponse(BaseModel):
    id: RequestId
    ok: Literal[False] = False
    error: ErrorBody


Response = Annotated[OkResponse | ErrorResponse, Field(discriminator="ok")]
response_adapter: TypeAdapter[Response] = TypeAdapter(Response)


# Framing ---------------------------------------------------------------------------------

def _request_id(data: Any) -> RequestId:
    """The id to echo in an error reply, when the request had a usable one."""
    if isinstance(data, dict):
        rid = data.get("id")
        if isinstance(rid, (int, str)) and not isinstance(rid, bool):
            return rid
    return None


def parse_request(line: bytes) -> tuple[RequestId, Request]:
    """Decode one request line.  Raises RequestError: the problem, and the id its reply echoes."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 and 5000-digit numbers
        raise RequestError(None, BadRequest(f"malformed JSON: {str(exc)[:200]}")) from None
    rid = _request_id(data)
    if not isinstance(data, dict):
        raise RequestError(rid, BadRequest("a request must be a JSON object"))
    command = data.get("command")
    if command is None:
        raise RequestError(rid, BadRequest(f'the request has no "command"; known: {", ".join(COMMANDS)}'))
    if command not in COMMANDS:
        raise RequestError(rid, UnknownCommand(f"unknown command {command!r}; known: {', '.join(COMMANDS)}",
                                               {"known": list(COMMANDS)}))
    try:
        return rid, _request_adapter.validate_python(data)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"][1:]) or "(request)", "message": e["msg"]}
                    for e in exc.errors(include_url=False, include_input=False)]
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise RequestError(rid, BadRequest(f"invalid {command} request: {text}", problems)) from None


def encode_ok(rid: RequestId, result: BaseModel | bytes) -> bytes:
    """An OkResponse, serialised once: the result model (or its JSON, already serialised from
    the model) framed by hand; building the OkResponse model would dump the result twice."""
    body = result if isinstance(result, bytes) else result.model_dump_json().encode()
    return b'{"id":%s,"ok":true,"result":%s}\n' % (json.dumps(rid).encode(), body)


def encode_error(rid: RequestId, err: TailcalldError) -> bytes:
    body = ErrorBody(code=err.code, message=err.message, details=err.details)
    return ErrorResponse(id=rid, error=body).model_dump_json().encode() + b"\n"
