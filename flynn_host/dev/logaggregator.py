"""`flynn-host component logaggregator` on free loopback ports, for tests and benchmarks: waited
for until it answers and always stopped, and the few things a test does with it (ship frames
as a host's log mux would, read what it holds)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flynn_logaggregator.client import Message, format_message

from flynn_host.dev import procs
from flynn_host.dev.host import free_ports


def aggregator_env(api_port: int, syslog_port: int, **extra: str) -> dict[str, str]:
    """The environment of an aggregator outside a cluster: loopback ports, no discoverd."""
    return {**os.environ, "PORT_0": str(api_port), "PORT_1": str(syslog_port),
            "LISTEN_IP": "127.0.0.1", "DISCOVERD": "none", "PYTHONPATH": procs.import_path(),
            **extra}  # fmt: skip


@dataclass
class LogAggregator:
    url: str
    syslog_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def lines(self, path: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return [json.loads(x) for x in r.read().splitlines() if x.strip()]

    def held(self, app_id: str) -> list[dict[str, Any]]:
        """Every message the aggregator holds for the app."""
        return self.lines(f"/log/{app_id}")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.syslog_port), timeout=30)

    def send(self, *msgs: Message) -> float:
        """Ship `msgs` on one connection, as a host's log mux does; when they were sent."""
        with self.connect() as s:
            s.sendall(b"".join(format_message(m) for m in msgs))
            return time.monotonic()

    def wait_accepted(self, app: str, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until app `app` holds `n` messages; returns what it holds then (or at the
        deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.held(app)
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    def wait_held(self, app_id: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """As `wait_accepted`, but fails unless `n` messages come within `timeout`."""
        got = self.wait_accepted(app_id, n, timeout)
        assert len(got) >= n, f"the aggregator holds {len(got)} of {n} messages"
        return got


@contextlib.contextmanager
def logaggregator_process(**extra_env: str) -> Iterator[LogAggregator]:
    api, syslog = free_ports(2)
    url = f"http://127.0.0.1:{api}"
    argv = procs.component_command("logaggregator")
    env = aggregator_env(api, syslog, **extra_env)
    with procs.started("logaggregator", argv, env, url + "/.well-known/status") as (proc, log):
        yield LogAggregator(url, syslog, proc, log)
