"""The metrics' pure parts, without root or kernel: the config keys, the recorder's counts and
histogram, and the HTTP responder's edge cases (on a real asyncio Unix socket in tmp_path)."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tailcalld import metrics_http
from tailcalld.config import Settings, load_settings, parse_listen
from tailcalld.errors import CompileError, ConfigError
from tailcalld.metrics import COMPILE_BUCKETS, Recorder
from tailcalld.metrics_http import HttpError, MetricsServer, Request, answer, parse_head

BODY = b"# TYPE tailcalld_test_total counter\ntailcalld_test_total 7\n"


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9479", ("127.0.0.1", 9479)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:65535", ("::1", 65535)),
    ("[::]:9479", ("::", 9479)), ("[fe80::1%eth0]:9479", ("fe80::1%eth0", 9479)),
])
def test_listen_addresses_accepted(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected
    assert Settings(metrics_listen=text).metrics_address == expected


@pytest.mark.parametrize(("text", "says"), [
    ("localhost:9479", "not a name"), (":9479", "is not HOST:PORT"), ("9479", "is not HOST:PORT"),
    ("127.0.0.1", "is not HOST:PORT"), ("127.0.0.1:0", "from 1 to 65535"), ("127.0.0.1:65536", "from 1 to 65535"),
    ("127.0.0.1:+80", "from 1 to 65535"), ("127.0.0.1:http", "from 1 to 65535"), ("::1:9479", "in brackets"),
    ("[127.0.0.1]:80", "in brackets"), ("[::1]", "from 1 to 65535"), ("1.2.3.4.5:80", "not a name"),
])
def test_bad_listen_addresses_are_refused_with_the_key_named(tmp_path: Path, text: str, says: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'metrics_listen = "{text}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert "metrics_listen" in err.value.message and says in err.value.message


def test_metrics_listen_must_be_a_string(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("metrics_listen = 9479\n")
    with pytest.raises(ConfigError, match="metrics_listen"):
        load_settings(config)


def test_metrics_socket_beside_the_control_socket_unless_set_and_off_when_empty(tmp_path: Path) -> None:
    control = Path("/run/x/tailcalld.sock")
    assert Settings().metrics_socket_path(control) == Path("/run/x/metrics.sock")
    assert Settings().metrics_socket_path(Settings().socket) == Path("/run/tailcalld/metrics.sock")
    assert Settings(metrics_socket="").metrics_socket_path(control) is None
    config = tmp_path / "c.toml"
    config.write_text('metrics_socket = "/run/m/metrics.sock"\nmetrics_listen = ""\n')
    s = load_settings(config)
    assert s.metrics_socket_path(control) == Path("/run/m/metrics.sock") and s.metrics_address is None
    config.write_text('metrics_socket = "metrics.sock"\n')
    with pytest.raises(ConfigError, match="metrics_socket.*absolute"):
        load_settings(config)


def test_the_metrics_keys_need_a_restart() -> None:
    from tailcalld.config import live_fields
    assert not {"metrics_socket", "metrics_listen"} & live_fields()


# -- the recorder ---------------------------------------------------------------------------

def families(recorder: Recorder) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels -> value}, as a scraper parses the recorder's text."""
    registry = CollectorRegistry()
    registry.register(recorder)
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_attaches_are_counted_by_result() -> None:
    recorder = Recorder()
    assert families(recorder)["tailcalld_attaches_total"] == {(("result", "ok"),): 0}  # there from the start
    with recorder.attaching():
        pass
    for error in (CompileError("no"), CompileError("again"), ValueError("a bug")):
        with pytest.raises(type(error)), recorder.attaching():
            raise error
    assert families(recorder)["tailcalld_attaches_total"] == {
        (("result", "ok"),): 1, (("result", "compile_error"),): 2, (("result", "internal"),): 1}


def test_compile_times_make_a_cumulative_histogram_per_dialect() -> None:
    recorder = Recorder()
    for seconds in (0.3, 0.5, 0.7, 1000.0):  # 0.5 sits on a bound: le counts it there
        recorder.compiled("bcc", seconds)
    recorder.compiled("libbpf", 1.2)
    found = families(recorder)
    buckets = found["tailcalld_compile_duration_seconds_bucket"]
    bcc = {dict(labels)["le"]: n for labels, n in buckets.items() if dict(labels)["dialect"] == "bcc"}
    assert len(bcc) == len(COMPILE_BUCKETS) + 1
    assert (bcc["0.25"], bcc["0.5"], bcc["1"], bcc["300"], bcc["+Inf"]) == (0, 2, 3, 3, 4)
    assert found["tailcalld_compile_duration_seconds_count"][(("dialect", "bcc"),)] == 4
    assert found["tailcalld_compile_duration_seconds_sum"][(("dialect", "bcc"),)] == pytest.approx(1001.5)
    assert found["tailcalld_compile_duration_seconds_count"][(("dialect", "libbpf"),)] == 1


# -- parsing and answering ------------------------------------------------------------------

def render(gzipped: bool) -> bytes:
    return gzip.compress(BODY) if gzipped else BODY


def test_a_request_head_is_parsed_with_either_line_end() -> None:
    for head in (b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n",
                 b"GET /metrics HTTP/1.0\nhost:a\naccept-encoding:  gzip  \n\n"):
        request = parse_head(head)
        assert (request.method, request.path, request.headers["host"]) == ("GET", "/metrics", "a")
        assert request.accepts_gzip()


@pytest.mark.parametrize(("head", "status"), [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n", 400),  # a TLS hello
    (b"GET /metrics\r\n\r\n", 400), (b"GET  /metrics HTTP/1.1\r\n\r\n", 400), (b"get\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505), (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n : empty name\r\n\r\n", 400), (b"GET /m\xe9trics HTTP/1.1\r\n\r\n", 400),
])
def test_bad_request_heads_are_refused(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as err:
        parse_head(head)
    assert err.value.status == status


@pytest.mark.parametrize(("value", "gzipped"), [
    ("gzip", True), ("deflate, gzip;q=0.5", True), ("GZIP", True), ("gzip;q=0", False), ("gzip; q=0.000", False),
    ("identity", False), ("", False), ("gzip;q=nonsense", False), ("x-gzip", False),
])
def test_gzip_only_when_asked(value: str, gzipped: bool) -> None:
    assert Request("GET", "/metrics", {"accept-encoding": value}).accepts_gzip() is gzipped


def split(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_answers() -> None:
    status, headers, body = split(answer(Request("GET", "/metrics"), render))
    assert (status, headers["content-type"], body) == (200, CONTENT_TYPE_LATEST, BODY)
    assert headers["content-length"] == str(len(BODY)) and headers["connection"] == "close"
    status, headers, body = split(answer(Request("GET", "/metrics", {"accept-encoding": "gzip"}), render))
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == BODY
    status, headers, body = split(answer(Request("HEAD", "/metrics"), render))
    assert (status, body, headers["content-length"]) == (200, b"", str(len(BODY)))
    for path in ("/", "/metrics/", "/metricsx", "/../metrics"):
        with pytest.raises(HttpError) as err:
            answer(Request("GET", path), render)
        assert err.value.status == 404
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "BREW"):
        with pytest.raises(HttpError) as err:
            answer(Request(method, "/metrics"), render)
        assert err.value.status == 405 and ("Allow", "GET, HEAD") in err.value.headers


# -- the server, on a real socket -----------------------------------------------------------

def serve(tmp_path: Path, scenario: Callable[[Path], Awaitable[None]], render: metrics_http.Render = render,
          admit: Callable[[socket.socket], str | None] = lambda sock: None) -> None:
    async def main() -> None:
        path = tmp_path / "m.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(64)
        server = MetricsServer(render, admit)
        await server.start(sock)
        try:
            await scenario(path)
        finally:
            await server.close()
            sock.close()

    asyncio.run(main())


async def exchange(path: Path, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` (and end the sending side), read the reply until the server closes."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(request)
    writer.write_eof()
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return split(reply)


GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def test_the_server_answers_and_refuses(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        assert (await exchange(path, GET))[0::2] == (200, BODY)
        assert (await exchange(path, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"))[0] == 405
        assert (await exchange(path, b"GET /other HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await exchange(path, b"\x00\xff garbage \x01\r\n\r\n"))[0] == 400
        assert (await exchange(path, b"GET /metrics HTTP/1.1\r\n"))[0] == 400  # ended before its blank line
        big = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 100 + b"\r\n"
        assert (await exchange(path, big * 100 + b"\r\n"))[0] == 431  # many lines, none too long
        assert (await exchange(path, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"))[0] == 431  # one long line
        assert (await exchange(path, GET))[0::2] == (200, BODY)  # and it serves on

    serve(tmp_path, scenario)


def test_a_client_that_never_finishes_its_request_is_timed_out_and_others_are_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "READ_TIMEOUT", 0.5)

    async def scenario(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")  # and then nothing: a slowloris
        await writer.drain()
        assert (await exchange(path, GET))[0::2] == (200, BODY)
        status, _, body = split(await asyncio.wait_for(reader.read(), 30))
        assert status == 408 and b"no complete request" in body
        writer.close()

    serve(tmp_path, scenario)


def test_connections_past_the_limit_get_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CLIENTS", 2)

    async def scenario(path: Path) -> None:
        held = [await asyncio.open_unix_connection(str(path)) for _ in range(2)]
        await asyncio.sleep(0.1)  # both accepted and waiting for their request
        assert (await exchange(path, GET))[0] == 503
        for _, writer in held:
            writer.close()
        for _ in range(100):  # the places come free as the server sees them go
            if (await exchange(path, GET))[0] == 200:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the server never served again after its clients left")

    serve(tmp_path, scenario)


def test_a_failing_render_is_a_500_and_the_next_scrape_works(tmp_path: Path) -> None:
    calls: list[bool] = []

    def flaky(gzipped: bool) -> bytes:
        calls.append(gzipped)
        if len(calls) == 1:
            raise RuntimeError("a bug in a collector")
        return BODY

    async def scenario(path: Path) -> None:
        assert (await exchange(path, GET))[0] == 500
        assert (await exchange(path, GET))[0::2] == (200, BODY)

    serve(tmp_path, scenario, render=flaky)


def test_a_refused_peer_gets_403_and_nothing_rendered(tmp_path: Path) -> None:
    def never(gzipped: bool) -> bytes:
        raise AssertionError("rendered for a refused peer")

    async def scenario(path: Path) -> None:
        status, _, body = await exchange(path, GET)
        assert status == 403 and b"not you" in body

    serve(tmp_path, scenario, render=never, admit=lambda sock: "not you")


def test_clients_that_vanish_do_not_stop_the_server(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        for request in (b"", b"GET /met", GET):
            _, writer = await asyncio.open_unix_connection(str(path))
            writer.write(request)
            writer.transport.abort()  # gone before (or while) the answer is written
        assert (await exchange(path, GET))[0::2] == (200, BODY)

    serve(tmp_path, scenario)
