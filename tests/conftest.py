"""Shared fixtures: the busybox test image, and real `flynn-host daemon` processes with their
own ports, state, work, run, volume and log directories (`flynn_host.dev.host`), torn down
completely even when a test fails."""

from __future__ import annotations

import http.client
import json
import os
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev import host as devhost
from flynn_host.dev.busybox import build_busybox_image
from flynn_host.dev.host import (  # noqa: F401  (re-exported for the test modules)
    IMAGES,
    ROOT,
    Daemon,
    busybox_job,
    free_port,
    mounts_under,
)
from flynn_host.runtime.cgroups import cgroups_of, remove_cgroups  # noqa: F401  (re-exported)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, runc)")


@pytest.fixture(scope="session")
def busybox_manifest() -> Path:
    return build_busybox_image(IMAGES)


@pytest.fixture
def make_daemon(busybox_manifest: Path) -> Iterator[Any]:
    """Factory: `make_daemon(host_id=..., extra_args=[...])` starts a daemon; all are removed
    at the end of the test, whatever happened."""
    made: list[Daemon] = []

    def factory(host_id: str | None = None, start: bool = True, **kw: Any) -> Daemon:
        d = devhost.make_daemon(host_id, start=False, **kw)
        made.append(d)
        if start:
            d.start()
        return d

    yield factory
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    return make_daemon()


def read_state(d: Daemon) -> dict[str, Any]:
    return json.loads((d.base / "state.json").read_text())


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    d: Daemon,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> RawResponse:
    """One hand-made request to a daemon's API (any bytes, any header; the daemon's auth
    headers added), for what HostClient cannot send. An event stream or an upgrade is closed
    after its headers; a socket timeout (a hang) raises TimeoutError."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={**d.auth_headers, **(headers or {})})
        resp = conn.getresponse()
        streaming = resp.status == 101 or "event-stream" in resp.getheader("Content-Type", "")
        data = b"" if streaming else resp.read()
        return RawResponse(resp.status, dict(resp.getheaders()), data)
    finally:
        conn.close()


def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def read_until(fd: int, pattern: bytes, timeout: float = 20.0) -> bytes:
    """What a pty (or any fd) gives until `pattern` shows up, the fd closes or `timeout`."""
    buf = b""
    deadline = time.monotonic() + timeout
    while pattern not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf
