"""The host API as a trust boundary (issue 9, docs/security.md): only holders of the cluster's
host key may use it, web pages may not, a second daemon cannot take over another's state, no
client can hold up a shutdown, and the sandbox fields a job could escape with are for system
jobs only."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from flynn_host.dev.host import Daemon, busybox_job, free_port

from .conftest import ROOT, needs_root

pytestmark = needs_root


def call(
    d: Daemon, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(d.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.strip() else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def basic(key: str, user: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


GUARDED = [
    ("GET", "/host/jobs"),
    ("GET", "/host/jobs/x-1"),
    ("PUT", "/host/jobs/x-1"),
    ("DELETE", "/host/jobs/x-1"),
    ("PUT", "/host/jobs/x-1/signal/TERM"),
    ("POST", "/attach"),
    ("POST", "/host/resource-check"),
    ("POST", "/host/discoverd"),
    ("POST", "/host/network"),
    ("POST", "/storage/providers/default/volumes"),
    ("GET", "/storage/volumes"),
    ("POST", "/host/images"),
    ("GET", "/host/images"),
    ("GET", "/plugins"),
    ("GET", "/no/such/path"),
]


def test_the_host_api_requires_the_host_key(daemon: Daemon) -> None:
    assert daemon.key
    for method, path in GUARDED:
        for headers in ({}, basic("wrong-key-0123456789"), {"Authorization": "Bearer nope"},
                        {"Authorization": "Basic !!!"}):  # fmt: skip
            status, body = call(daemon, method, path, headers, {} if method != "GET" else None)
            assert (status, body["code"]) == (401, "unauthorized"), (method, path, headers)
    # nothing was done by the refused requests
    assert (
        daemon.client.list_jobs() == {} and daemon.client.request("GET", "/storage/volumes") == []
    )
    # the key as Basic password (any user) or as a bearer token
    assert call(daemon, "GET", "/host/jobs", basic(daemon.key))[0] == 200
    assert call(daemon, "GET", "/host/jobs", basic(daemon.key, "flynn"))[0] == 200
    assert call(daemon, "GET", "/host/jobs", {"Authorization": f"Bearer {daemon.key}"})[0] == 200
    # health checks stay open
    assert call(daemon, "GET", "/host/status")[1]["id"] == daemon.host_id
    assert call(daemon, "GET", "/.well-known/status")[1]["data"]["status"] == "healthy"


def test_requests_from_web_pages_are_refused_even_with_the_key(daemon: Daemon) -> None:
    key = basic(daemon.key or "")
    # what a browser adds to a page's cross-origin POST (a "simple" text/plain request, which
    # needs no CORS preflight), and to any fetch
    for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                  {"Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Site": "cross-site"}):  # fmt: skip
        headers = {**key, **extra, "Content-Type": "text/plain"}
        job = busybox_job(daemon.new_job_id(), ["true"])
        status, body = call(daemon, "PUT", f"/host/jobs/{job['id']}", headers, job)
        assert (status, body["code"]) == (403, "forbidden")
        assert call(daemon, "GET", "/host/status", extra)[0] == 403
    assert daemon.client.list_jobs() == {}


def test_commands_on_the_host_use_its_key(daemon: Daemon) -> None:
    out = daemon.run_cli("run", "busybox", "echo", "hi")
    assert (out.returncode, out.stdout) == (0, "hi\n")
    assert daemon.run_cli("ps", "-a").returncode == 0
    # without the host config (and so without the key) a command gets the API's refusal
    env = {**daemon.cli_env, "FLYNN_HOST_CONFIG": "/nonexistent/host.json"}
    refused = daemon.run_cli("ps", env=env)
    assert refused.returncode == 1 and "host key" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_only_system_jobs_get_the_host_key(daemon: Daemon) -> None:
    user, system = daemon.new_job_id(), daemon.new_job_id()
    daemon.client.add_job(busybox_job(user, ["env"]))
    daemon.client.add_job(busybox_job(system, ["env"], partition="system"))
    daemon.wait_job(user)
    daemon.wait_job(system)
    assert "FLYNN_HOST_KEY" not in daemon.run_cli("log", user).stdout
    assert f"FLYNN_HOST_KEY={daemon.key}\n" in daemon.run_cli("log", system).stdout


@pytest.mark.parametrize(
    "field, value",
    [
        ("mounts", [{"location": "/", "target": "/host"}]),
        ("host_network", True),
        ("linux_capabilities", ["CAP_SYS_ADMIN"]),
        ("host_pid_namespace", True),
        ("writeable_cgroups", True),
        ("allowed_devices", [{"type": "c", "major": 1, "minor": 3}]),
    ],
)
def test_sandbox_escapes_are_for_system_jobs_only(daemon: Daemon, field: str, value: Any) -> None:
    for partition in (None, "user", "background"):
        job = busybox_job(daemon.new_job_id(), ["true"], **{field: value})
        if partition:
            job["partition"] = partition
        status, body = call(daemon, "PUT", f"/host/jobs/{job['id']}", daemon.auth_headers, job)
        assert status == 400 and body["detail"] == {"field": f"config.{field}"}, body
        assert "only allowed for jobs in the system partition" in body["message"]
    assert daemon.client.list_jobs() == {}


def test_user_jobs_cannot_read_host_files_or_send_raw_packets(daemon: Daemon) -> None:
    job_id = daemon.new_job_id()
    script = "grep CapBnd /proc/self/status; cat /etc/shadow 2>&1 | head -c 100"
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", script]))
    daemon.wait_job(job_id)
    out = daemon.run_cli("log", job_id).stdout
    cap_bnd = int(out.split()[1], 16)
    assert not cap_bnd & (1 << 13)  # CAP_NET_RAW
    assert not cap_bnd & (1 << 12)  # CAP_NET_ADMIN
    assert "root:" not in out  # the image's /etc/shadow, if any, is not the host's
    system = daemon.new_job_id()
    daemon.client.add_job(busybox_job(system, ["grep", "CapBnd", "/proc/self/status"],
                                      partition="system"))  # fmt: skip
    daemon.wait_job(system)
    assert int(daemon.run_cli("log", system).stdout.split()[1], 16) & (1 << 13)


# --- one daemon per state ----------------------------------------------------------------------


def start_second(d: Daemon, *replace: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    """A second daemon on `d`'s directories (with some flags replaced), which must not start."""
    args = d.args()
    args[args.index("--http-port") + 1] = str(free_port())
    for flag, value in replace:
        args[args.index(flag) + 1] = value
    env = {**os.environ, "FLYNN_HOST_CONFIG": str(d.base / "host.json")}
    return subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=20)


def test_a_second_daemon_on_the_same_state_exits_at_once(daemon: Daemon, tmp_path: Any) -> None:
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sleep", "1000"]))
    running = daemon.wait_job(job_id, ("running",))
    assert daemon.proc is not None
    holder = f"another flynn-host daemon (pid {daemon.proc.pid})"
    for replace in [
        (),  # everything the same
        (("--id", "other"), ("--state", str(tmp_path / "s.json")),
         ("--run-dir", str(tmp_path / "run"))),  # only --work-dir shared
        (("--state", str(tmp_path / "s.json")), ("--work-dir", str(tmp_path / "work"))),  # run
        (("--work-dir", str(tmp_path / "w")), ("--run-dir", str(tmp_path / "r"))),  # state
    ]:  # fmt: skip
        t0 = time.monotonic()
        out = start_second(daemon, *replace)
        assert out.returncode == 1 and holder in out.stderr, (replace, out.stderr)
        assert time.monotonic() - t0 < 15
    # the first daemon's job was neither adopted nor touched
    again = daemon.client.get_job(job_id)
    assert again["status"] == "running" and again["pid"] == running["pid"]
    os.kill(running["pid"], 0)
    # the lock goes with its holder: a daemon killed outright is replaced at once
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert daemon.client.get_job(job_id)["status"] == "running"


# --- shutdown -----------------------------------------------------------------------------------


def open_stream(d: Daemon, request: bytes) -> socket.socket:
    """A client that sends `request` and then never reads again."""
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(request)
    return s


def test_streams_and_attach_sessions_do_not_hold_up_shutdown(daemon: Daemon) -> None:
    auth = "".join(f"{k}: {v}\r\n" for k, v in daemon.auth_headers.items())
    job_id = daemon.new_job_id()
    # a chatty job, so the streams' clients (which never read) fill their buffers
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", "while :; do echo $RANDOM; done"]))
    daemon.wait_job(job_id, ("running",))
    sse = f"GET /host/jobs HTTP/1.1\r\nHost: x\r\n{auth}Accept: text/event-stream\r\n\r\n"
    job_sse = sse.replace("/host/jobs ", f"/host/jobs/{job_id} ")
    body = json.dumps({"job_id": job_id, "flags": 1 | 2 | 8 | 16})
    attach = (f"POST /attach HTTP/1.1\r\nHost: x\r\n{auth}Upgrade: flynn-attach/0\r\n"
              f"Connection: Upgrade\r\nContent-Length: {len(body)}\r\n\r\n{body}")  # fmt: skip
    clients = [open_stream(daemon, r.encode()) for r in (sse, job_sse, attach, attach)]
    # and one stream opened and closed again
    open_stream(daemon, sse.encode()).close()
    for _ in range(8):  # events for the streams
        other = daemon.new_job_id()
        daemon.client.add_job(busybox_job(other, ["true"]))
        daemon.wait_job(other)
    t0 = time.monotonic()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(60)
    took = time.monotonic() - t0
    for c in clients:
        c.close()
    assert daemon.proc.returncode == 0
    # the stop timeout is 3 s (devhost); the jobs end on SIGTERM at once
    assert took < 3 + 7, f"shutdown took {took:.1f}s"
