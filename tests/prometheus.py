"""A real Prometheus server for tests: Debian's `prometheus`, on a free loopback port, scraping
the given targets every second, with its storage in the test's temporary folder; stopped with
its whole process group whatever the test did."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, port: int) -> None:
        self.port = port

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector's samples; [] while the server is not up yet."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                answer = json.load(reply)
        except OSError:
            return []
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def values(self, promql: str, label: str) -> dict[str, str]:
        """label value -> sample value, of each series the query returns."""
        return {r["metric"].get(label, ""): r["value"][1] for r in self.query(promql)}


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, targets: Sequence[str], job: str = "tailcalld") -> Iterator[Prometheus]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: {json.dumps(list(targets))}
""")
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Prometheus(port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
