"""`flynn-host component logaggregator` on free loopback ports for logaggregator's tests, and a
small log shipper (what a host's log mux does): waited for and always stopped."""

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

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.syslog_port), timeout=30)

    def wait_accepted(self, app: str, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until app `app` holds `n` messages; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.lines(f"/log/{app}")
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


@contextlib.contextmanager
def logaggregator_process(**extra_env: str) -> Iterator[LogAggregator]:
    api, syslog = free_ports(2)
    env = {**os.environ, "PORT_0": str(api), "PORT_1": str(syslog), "LISTEN_IP": "127.0.0.1",
           "DISCOVERD": "none", "PYTHONPATH": procs.import_path(), **extra_env}  # fmt: skip
    url = f"http://127.0.0.1:{api}"
    argv = procs.component_command("logaggregator")
    with procs.started("logaggregator", argv, env, url + "/.well-known/status") as (proc, log):
        yield LogAggregator(url, syslog, proc, log)


def message(seq: int, app: str = "app1", host: str = "host1", **kw: Any) -> Message:
    """Message number `seq` of `host`: its time grows with seq, so (time, seq) orders them."""
    fields: dict[str, Any] = {
        "app_id": app, "host_id": host, "job_id": "job1", "process_type": "web",
        "stream": "stdout", "time": 1_450_000_000_000_000_000 + seq * 1000, "seq": seq,
        "msg": f"line {seq}",
    }  # fmt: skip
    fields.update(kw)
    return Message(**fields)


def send(sock: socket.socket, msgs: list[Message], chunk: int = 1000) -> None:
    for i in range(0, len(msgs), chunk):
        sock.sendall(b"".join(format_message(m) for m in msgs[i : i + chunk]))
