"""Daemon settings: one pydantic model, read from TOML at start and on reload (SIGHUP).

Fields marked ``LIVE`` take effect on reload; the others need a restart.  The running
daemon's parts all read one ``LiveSettings`` holder at the moment they need a value, so a
reload is one assignment plus the few reactions a change needs (``LiveSettings.on_reload``).
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from .control_socket import DEFAULT_SOCKET  # noqa: F401  (its home: tailcallctl reads it without pydantic)
from .errors import ConfigError
from .protocol import MAX_HEADERS, MAX_HEADERS_BYTES, MAX_OBJECT_CHARS, MAX_SOURCE_CHARS

DEFAULT_CONFIG = Path("/etc/tailcalld/tailcalld.toml")

LogLevel = Literal["debug", "info", "warning", "error"]
LIVE: dict[str, Any] = {"live": True}  # json_schema_extra of a field a reload applies

logger = logging.getLogger("tailcalld")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: Path = Field(DEFAULT_SOCKET, description="Unix socket the control protocol listens on")
    pin_dir: Path = Field(Path("/sys/fs/bpf/tailcalld"), description="bpffs folder for the pinned dispatcher")
    state_dir: Path = Field(Path("/var/lib/tailcalld"), description="persistent state")
    # Strict numbers: TOML's `true` must not turn into an interval of 1 s or into slot 1.  Every
    # number has both bounds: below the lower one the daemon burns a CPU or refuses all work,
    # above the upper one a slip (an extra zero or three) would go unnoticed.
    miss_log_interval: float = Field(10.0, ge=0.25, le=86400, strict=True,
                                     description="seconds between miss summaries", json_schema_extra=LIVE)
    watch_misses: Literal["all"] | list[StrictInt | StrictStr] = Field(
        default_factory=list, description="slots whose misses are logged besides those that held a handler",
        json_schema_extra=LIVE)
    # 16 MiB holds the largest request the protocol admits (a 1 Mi-character source, escaped).
    max_request_bytes: int = Field(1 << 20, ge=1024, le=16 << 20, strict=True,
                                   description="largest request line accepted")
    # No more than the protocol's own maximum: a larger setting could never be reached.
    max_source_bytes: int = Field(512 * 1024, ge=1, le=MAX_SOURCE_CHARS, strict=True,
                                  description="largest handler source accepted", json_schema_extra=LIVE)
    # Objects have their own: the same program is larger as an object than as source (relocations,
    # .BTF), and the protocol carries at most 1.5 MiB of one (base64).
    max_object_bytes: int = Field(1 << 20, ge=1, le=MAX_OBJECT_CHARS // 4 * 3, strict=True,
                                  description="largest handler object (.o) accepted", json_schema_extra=LIVE)
    # The local headers a source brings (tailcallctl sends the quoted #includes found next to it).
    max_headers: int = Field(32, ge=0, le=MAX_HEADERS, strict=True, json_schema_extra=LIVE,
                             description="local headers one handler source may bring")
    max_headers_bytes: int = Field(1 << 20, ge=0, le=MAX_HEADERS_BYTES, strict=True, json_schema_extra=LIVE,
                                   description="bytes of local headers one handler source may bring, together")
    # No more than the fd limit the daemon raises itself to has room for (daemon.raise_fd_limit).
    max_connections: int = Field(64, ge=1, le=1024, strict=True, description="control connections served at once",
                                 json_schema_extra=LIVE)
    idle_timeout: float = Field(300.0, ge=1, le=86400, strict=True,
                                description="seconds a connection may stay silent (or not read replies) before it is closed",
                                json_schema_extra=LIVE)
    compile_timeout: float = Field(60.0, ge=1, le=3600, strict=True,
                                   description="seconds a compile+load may take before it is killed",
                                   json_schema_extra=LIVE)
    # What compiles produced, kept under state_dir/cache/programs (program_cache.py): a restart
    # or reboot loads the handlers again without compiling them.  A bcc entry is ~10 KiB, a
    # libbpf one (the object, with its BTF) tens of KiB: 64 MiB holds thousands.
    compile_cache_bytes: int = Field(64 << 20, ge=0, le=16 << 30, strict=True, json_schema_extra=LIVE,
                                     description="bytes of compiled handlers kept for later loads; 0: no cache")
    allowed_group: str | None = Field(None, json_schema_extra=LIVE,
                                      description="group whose members may use the socket (0660); root-equivalent")
    log_level: LogLevel = Field("info", json_schema_extra=LIVE)
    # An address-space limit (RLIMIT_AS) of the compile worker and of clang: a bcc compile of a
    # small handler peaks near 300 MiB here, a hostile macro nest would take all the host has.
    compile_memory_max: int = Field(2 << 30, ge=256 << 20, le=64 << 30, strict=True, json_schema_extra=LIVE,
                                    description="bytes of address space a compile may use before it is stopped")
    max_map_bytes: int = Field(256 << 20, ge=1, le=64 << 30, strict=True, json_schema_extra=LIVE,
                               description="bytes the maps of one handler may take (keys and values, per CPU)")
    # Root is not capped per uid: it has a place reserved beyond max_connections instead (server.py).
    max_connections_per_uid: int = Field(16, ge=1, le=1024, strict=True, json_schema_extra=LIVE,
                                         description="control connections one user other than root may hold at once")

    # The handlers' event channel (events.py).  The ring buffer is made once, at the first start
    # with a pin_dir: handlers hold it, so a new size takes effect only after unload-all.
    events_buffer_bytes: int = Field(4 << 20, ge=64 << 10, le=1 << 30, strict=True,
                                     description="size of the handlers' event ring buffer (a power of two)")
    events_journal_rate: float = Field(50.0, ge=0.1, le=100000, strict=True, json_schema_extra=LIVE,
                                       description="events per second one --journal slot may write to the journal; "
                                                   "the rest are counted as suppressed")
    events_backlog: int = Field(1000, ge=0, le=1000000, strict=True, json_schema_extra=LIVE,
                                description="latest events kept in memory for `tailcallctl events`")
    events_client_bytes: int = Field(4 << 20, ge=64 << 10, le=1 << 30, strict=True, json_schema_extra=LIVE,
                                     description="bytes of events a slow `events -f` client may have unread before "
                                                 "its events are dropped (and counted)")

    # The name every journal entry of this daemon carries (TAILCALLD_INSTANCE=), so that the
    # entries of several daemons on one host (each with its own pin_dir) can be told apart.  Not
    # live: a daemon's name in its journal stays the same for as long as it runs.
    instance: str = Field("", max_length=256, strict=True,
                          description='name in every journal entry (TAILCALLD_INSTANCE=); "" means pin_dir\'s path')

    @property
    def instance_name(self) -> str:
        """What ``TAILCALLD_INSTANCE=`` says: the configured ``instance``, else the pin folder."""
        return self.instance or str(self.pin_dir)

    # Metrics for Prometheus (metrics.py, metrics_http.py).  Both are bound at start, before the
    # kernel is touched, so a taken port stops the start instead of leaving a daemon without them.
    metrics_socket: Path | Literal[""] | None = Field(
        None, description="Unix socket serving GET /metrics (Prometheus text); unset: metrics.sock beside socket; "
                          "\"\": off")
    metrics_listen: str = Field("", description="HOST:PORT serving GET /metrics over TCP (IPv4, or IPv6 in "
                                                "brackets); \"\": off")

    @field_validator("metrics_socket")
    @classmethod
    def _absolute(cls, path: Path | str | None) -> Path | str | None:
        if isinstance(path, Path) and not path.is_absolute():
            raise ValueError(f"{str(path)!r} is not an absolute path")
        return path

    @field_validator("metrics_listen")
    @classmethod
    def _address(cls, text: str) -> str:
        if text:
            parse_listen(text)
        return text

    def metrics_socket_path(self, control_socket: Path) -> Path | None:
        """Where the metrics socket goes: as set, beside the control socket when unset, None when off."""
        if self.metrics_socket is None:
            return control_socket.parent / "metrics.sock"
        return self.metrics_socket or None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_listen(self.metrics_listen) if self.metrics_listen else None

    # Declarative state (desired_slots.py): an apply file the daemon makes the slots match.
    desired_slots: Path | None = Field(None, json_schema_extra=LIVE,
                                       description='an apply file to reconcile the slots to at start, on reload and '
                                                   'when it changes; "" or unset: none')

    @field_validator("desired_slots", mode="before")
    @classmethod
    def _desired_slots(cls, value: object) -> object:
        if value == "":
            return None
        if isinstance(value, str) and not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @field_validator("events_buffer_bytes")
    @classmethod
    def _power_of_two(cls, size: int) -> int:
        if size & (size - 1):
            raise ValueError(f"{size} is not a power of two (the kernel's ring buffers are)")
        return size

    @field_validator("instance")
    @classmethod
    def _one_printable_line(cls, name: str) -> str:
        if any(ord(c) < 0x20 or ord(c) == 0x7f for c in name):
            raise ValueError("must be one line of printable characters (it is a journal field's value)")
        return name

    @field_validator("allowed_group")
    @classmethod
    def _group_exists(cls, name: str | None) -> str | None:
        if name is not None:
            try:
                grp.getgrnam(name)
            except KeyError:
                raise ValueError(f"no group named {name!r} on this system") from None
        return name

    @property
    def allowed_gid(self) -> int | None:
        return grp.getgrnam(self.allowed_group).gr_gid if self.allowed_group else None


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of a "HOST:PORT": an IPv4 address, or an IPv6 one in brackets, and a port
    1..65535.  Names are refused: what they resolve to could change under a running daemon."""
    host, sep, port = text.rpartition(":")
    example = "e.g. 127.0.0.1:9479, 0.0.0.0:9479 or [::1]:9479"
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT ({example})")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"{text!r}: the host must be an IPv4 address or an IPv6 address in brackets "
                         f"({example}), not a name") from None
    if (address.version == 6) != bracketed:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets, an IPv4 one without ({example})")
    return str(address), int(port)


NUMERIC_SETTINGS = frozenset(k for k, f in Settings.model_fields.items() if f.annotation in (int, float))
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"})


def bounds(key: str) -> tuple[float, float]:
    """The inclusive (lower, upper) bounds of a numeric setting, as its field declares them."""
    schema = Settings.model_json_schema()["properties"][key]
    return schema["minimum"], schema["maximum"]


def _range_message(key: str, value: object) -> str:
    """Both bounds, whichever one was crossed: the reader learns the whole range at once."""
    lower, upper = bounds(key)
    return f"{value!r} is out of range; it must be between {lower:g} and {upper:g}"


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] in _RANGE_ERRORS and key in NUMERIC_SETTINGS:
            lines.append(f"{key}: {_range_message(key, err['input'])}")
        else:
            lines.append(f"{key}: {err['msg']}")
    return "; ".join(lines)


def load_settings(path: Path) -> Settings:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {str(exc)[:200]}") from None
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}: {format_validation_error(exc)}") from None


def live_fields() -> frozenset[str]:
    """The settings a reload applies to a running daemon (marked ``LIVE`` above)."""
    return frozenset(name for name, field in Settings.model_fields.items()
                     if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("live"))


Reaction = Callable[[Settings, Settings, frozenset[str]], None]


class LiveSettings:
    """The settings in force.  Parts keep this holder, not a copy, and read ``current`` when
    they act, so a reload reaches them all at once; ``on_reload`` is for the changes that need
    an action (a socket's mode, a log level), not just a new value."""

    def __init__(self, settings: Settings) -> None:
        self.current = settings
        self._reactions: list[Reaction] = []

    def on_reload(self, reaction: Reaction) -> None:
        """``reaction(old, new, changed_live_fields)`` runs after every reload that changed something live."""
        self._reactions.append(reaction)

    def reload(self, new: Settings, source: Path) -> frozenset[str]:
        """Apply the live fields of ``new``; keep the others as they are (logged), and return
        the live fields that changed."""
        old = self.current
        changed = {k for k in Settings.model_fields if getattr(new, k) != getattr(old, k)}
        live = frozenset(changed & live_fields())
        for key in sorted(changed - live):
            logger.warning("reload: %s changed in %s; it takes effect at the next restart", key, source)
        self.current = new.model_copy(update={k: getattr(old, k) for k in changed - live})
        if live:
            for reaction in self._reactions:
                reaction(old, self.current, live)
        return live
