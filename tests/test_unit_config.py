"""Unit tests for load_settings / Settings.  Only files under tmp_path and the repo's sample config."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailcalld.config import (DEFAULT_SOCKET, NUMERIC_SETTINGS, LiveSettings, Settings, bounds, live_fields,
                              load_settings)
from tailcalld.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "tailcalld.toml"


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "tailcalld.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.code == "config_error"
    return info.value


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""))
    assert s == Settings()
    assert s.socket == DEFAULT_SOCKET == Path("/run/tailcalld/tailcalld.sock")
    assert s.pin_dir == Path("/sys/fs/bpf/tailcalld")
    assert s.state_dir == Path("/var/lib/tailcalld")
    assert s.miss_log_interval == 10.0
    assert s.watch_misses == []
    assert s.max_request_bytes == 1 << 20
    assert s.compile_timeout == 60.0
    assert s.log_level == "info"


def test_comments_only_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing set\n\n")) == Settings()


def test_repo_sample_config_loads_and_equals_defaults() -> None:
    assert REPO_CONFIG.is_file()
    s = load_settings(REPO_CONFIG)
    assert s == Settings()
    assert isinstance(s.miss_log_interval, float)  # written as the integer 10
    assert isinstance(s.socket, Path)


def test_every_key_can_be_set(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, """
socket = "/tmp/x.sock"
pin_dir = "/sys/fs/bpf/other"
state_dir = "/tmp/state"
miss_log_interval = 2.5
watch_misses = ["fchmodat", 110, "268"]
max_request_bytes = 4096
compile_timeout = 5
log_level = "debug"
"""))
    assert s.socket == Path("/tmp/x.sock")
    assert s.pin_dir == Path("/sys/fs/bpf/other")
    assert s.state_dir == Path("/tmp/state")
    assert s.miss_log_interval == 2.5
    assert s.watch_misses == ["fchmodat", 110, "268"]
    assert [type(v) for v in s.watch_misses] == [str, int, str]  # type: ignore[union-attr]
    assert s.max_request_bytes == 4096
    assert s.compile_timeout == 5.0
    assert s.log_level == "debug"


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValueError):
        s.log_level = "debug"  # type: ignore[misc]


@pytest.mark.parametrize("text,key", [
    ("sockets = '/x'\n", "sockets"),
    ("miss_interval = 5\n", "miss_interval"),
    ("[daemon]\nsocket = '/x'\n", "daemon"),
])
def test_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    err = config_error(path)
    assert f"{key}: Extra inputs are not permitted" in err.message
    assert str(path) in err.message


@pytest.mark.parametrize("value", ["0", "-1", '"x"', "86401", "[]", "nan"])
def test_bad_miss_log_interval_is_named(tmp_path: Path, value: str) -> None:
    err = config_error(write(tmp_path, f"miss_log_interval = {value}\n"))
    assert err.message.startswith("invalid config ")
    assert "miss_log_interval:" in err.message
    assert "watch_misses" not in err.message


def test_miss_log_interval_bounds_are_inclusive(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "miss_log_interval = 86400\n")).miss_log_interval == 86400
    assert load_settings(write(tmp_path, "miss_log_interval = 0.25\n")).miss_log_interval == 0.25


# Every numeric setting, with the range each must keep (issue #10: 1e-300 s burned a CPU).
BOUNDS = {
    "miss_log_interval": (0.25, 86400),
    "max_request_bytes": (1024, 16 << 20),
    "max_source_bytes": (1, 1 << 20),
    "max_object_bytes": (1, 3 << 19),
    "max_headers": (0, 256),
    "max_headers_bytes": (0, 8 << 20),
    "max_connections": (1, 1024),
    "idle_timeout": (1, 86400),
    "compile_timeout": (1, 3600),
    "compile_cache_bytes": (0, 16 << 30),
    "max_connections_per_uid": (1, 1024),
    "compile_memory_max": (256 << 20, 64 << 30),
    "max_map_bytes": (1, 64 << 30),
    "events_buffer_bytes": (64 << 10, 1 << 30),
    "events_journal_rate": (0.1, 100000),
    "events_backlog": (0, 1000000),
    "events_client_bytes": (64 << 10, 1 << 30),
}


def test_events_buffer_must_be_a_power_of_two(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "events_buffer_bytes = 100000\n"))
    assert "events_buffer_bytes" in err.message and "power of two" in err.message


def test_every_numeric_setting_has_declared_bounds() -> None:
    assert set(BOUNDS) == NUMERIC_SETTINGS
    for key, expected in BOUNDS.items():
        assert bounds(key) == expected, key


def _toml_number(key: str, value: float) -> str:
    is_int = Settings.model_fields[key].annotation is int
    return str(int(value)) if is_int else repr(float(value))


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_numeric_settings_accept_both_bounds(tmp_path: Path, key: str) -> None:
    lower, upper = BOUNDS[key]
    for value in (lower, upper):
        assert getattr(load_settings(write(tmp_path, f"{key} = {_toml_number(key, value)}\n")), key) == value


@pytest.mark.parametrize("key", sorted(BOUNDS))
@pytest.mark.parametrize("side", ["below", "above"])
def test_numeric_settings_out_of_range_name_the_key_and_both_bounds(tmp_path: Path, key: str, side: str) -> None:
    lower, upper = BOUNDS[key]
    is_int = Settings.model_fields[key].annotation is int
    value = (lower - (1 if is_int else lower / 2)) if side == "below" else upper + 1
    err = config_error(write(tmp_path, f"{key} = {_toml_number(key, value)}\n"))
    assert f"{key}: " in err.message
    assert f"must be between {lower:g} and {upper:g}" in err.message


@pytest.mark.parametrize("value", ["1e-300", "0.0", "-inf", "inf", "nan"])
def test_degenerate_miss_log_interval_is_refused_with_its_range(tmp_path: Path, value: str) -> None:
    err = config_error(write(tmp_path, f"miss_log_interval = {value}\n"))
    assert f"miss_log_interval: {float(value)!r} is out of range; it must be between 0.25 and 86400" in err.message


@pytest.mark.parametrize("text,key", [
    ("max_request_bytes = 1023\n", "max_request_bytes"),
    ("compile_timeout = 0\n", "compile_timeout"),
    ('log_level = "verbose"\n', "log_level"),
    ("socket = 5\n", "socket"),
])
def test_other_bad_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    err = config_error(write(tmp_path, text))
    assert f"{key}:" in err.message


def test_several_bad_keys_are_all_named(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "miss_log_interval = 0\nbogus = 1\nlog_level = 'loud'\n"))
    for key in ("miss_log_interval", "bogus", "log_level"):
        assert f"{key}:" in err.message


@pytest.mark.parametrize("text", ["socket = \n", "[unclosed\n", "a = 'x' b = 1\n", "x = 1\nx = 2\n",
                                  "log_level = \"a\x00b\"\n"])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    err = config_error(path)
    assert err.message.startswith(f"{path} is not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = config_error(path)
    assert err.message == f"config file {path} does not exist"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    err = config_error(tmp_path)
    assert err.message.startswith(f"cannot read config file {tmp_path}")


@pytest.mark.parametrize("text,expected", [
    ('watch_misses = "all"\n', "all"),
    ("watch_misses = []\n", []),
    ("watch_misses = [268, 110]\n", [268, 110]),
    ('watch_misses = ["fchmodat", "getppid"]\n', ["fchmodat", "getppid"]),
    ('watch_misses = ["fchmodat", 110]\n', ["fchmodat", 110]),
])
def test_watch_misses_accepted(tmp_path: Path, text: str, expected: object) -> None:
    assert load_settings(write(tmp_path, text)).watch_misses == expected


@pytest.mark.parametrize("text", ['watch_misses = "ALL"\n', 'watch_misses = "fchmodat"\n',
                                  "watch_misses = 268\n", "watch_misses = [[1]]\n",
                                  "watch_misses = [{a = 1}]\n"])
def test_watch_misses_rejected(tmp_path: Path, text: str) -> None:
    err = config_error(write(tmp_path, text))
    assert "watch_misses" in err.message


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, b'log_level = "\xff"\n'))
    assert "not valid TOML" in err.message or "UTF-8" in err.message


def test_huge_integer_is_a_config_error(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "max_request_bytes = " + "9" * 5000 + "\n"))
    assert "max_request_bytes" in err.message or "TOML" in err.message


def test_boolean_miss_log_interval_is_rejected(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "miss_log_interval = true\n"))
    assert "miss_log_interval" in err.message


def test_boolean_in_watch_misses_is_rejected(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "watch_misses = [true]\n"))
    assert "watch_misses" in err.message


# Live settings ------------------------------------------------------------------------------

def test_the_live_fields_are_the_ones_a_reload_applies() -> None:
    assert live_fields() == {"miss_log_interval", "watch_misses", "log_level", "compile_timeout", "allowed_group",
                             "max_source_bytes", "max_object_bytes", "max_headers", "max_headers_bytes",
                             "max_connections", "idle_timeout", "compile_memory_max",
                             "max_map_bytes", "max_connections_per_uid", "events_journal_rate", "events_backlog",
                             "events_client_bytes", "desired_slots", "compile_cache_bytes"}


def test_a_reload_applies_live_fields_keeps_the_rest_and_tells_the_reactions(tmp_path: Path) -> None:
    live = LiveSettings(Settings())
    seen: list[tuple[Settings, Settings, frozenset[str]]] = []
    live.on_reload(lambda old, new, changed: seen.append((old, new, changed)))
    new = Settings(compile_timeout=5.0, log_level="debug", pin_dir=tmp_path / "elsewhere")
    assert live.reload(new, tmp_path / "t.toml") == {"compile_timeout", "log_level"}
    assert (live.current.compile_timeout, live.current.log_level) == (5.0, "debug")
    assert live.current.pin_dir == Settings().pin_dir  # needs a restart: the running value stays
    assert [changed for _, _, changed in seen] == [{"compile_timeout", "log_level"}]
    assert seen[0][1] is live.current


def test_a_reload_with_no_live_change_runs_no_reaction(tmp_path: Path) -> None:
    live = LiveSettings(Settings())
    seen: list[frozenset[str]] = []
    live.on_reload(lambda old, new, changed: seen.append(changed))
    assert live.reload(Settings(state_dir=tmp_path), tmp_path / "t.toml") == frozenset()
    assert seen == [] and live.current == Settings()


def test_desired_slots_is_an_absolute_path_or_none(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, 'desired_slots = ""\n')).desired_slots is None
    assert load_settings(write(tmp_path, 'desired_slots = "/etc/tailcalld/slots.toml"\n')).desired_slots == \
        Path("/etc/tailcalld/slots.toml")
    err = config_error(write(tmp_path, 'desired_slots = "slots.toml"\n'))
    assert "desired_slots" in err.message and "not an absolute path" in err.message
