"""Daemon settings: one pydantic model, read once from TOML at start (and on reload)."""

from __future__ import annotations

import grp
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from .errors import ConfigError

DEFAULT_CONFIG = Path("/etc/tailcalld/tailcalld.toml")
DEFAULT_SOCKET = Path("/run/tailcalld/tailcalld.sock")

LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: Path = Field(DEFAULT_SOCKET, description="Unix socket the control protocol listens on")
    pin_dir: Path = Field(Path("/sys/fs/bpf/tailcalld"), description="bpffs folder for the pinned dispatcher")
    state_dir: Path = Field(Path("/var/lib/tailcalld"), description="persistent state")
    # Strict numbers: TOML's `true` must not turn into an interval of 1 s or into slot 1.
    miss_log_interval: float = Field(10.0, gt=0, le=86400, strict=True, description="seconds between miss summaries")
    watch_misses: Literal["all"] | list[StrictInt | StrictStr] = Field(
        default_factory=list, description="slots whose misses are logged besides those that held a handler")
    max_request_bytes: int = Field(1 << 20, ge=1024, strict=True, description="largest request line accepted")
    max_source_bytes: int = Field(512 * 1024, ge=1, strict=True, description="largest handler source accepted")
    max_connections: int = Field(64, ge=1, strict=True, description="control connections served at once")
    idle_timeout: float = Field(300.0, gt=0, strict=True,
                                description="seconds a connection may stay silent (or not read replies) before it is closed")
    compile_timeout: float = Field(60.0, gt=0, strict=True, description="seconds a compile+load may take before it is killed")
    allowed_group: str | None = Field(None, description="group whose members may use the socket (0660); root-equivalent")
    log_level: LogLevel = "info"

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


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
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
