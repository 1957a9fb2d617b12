"""Host-level API and CLI: status, tags, resource checks, `--force`, attach to a failed job,
and the command's own usage texts."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time
from urllib.parse import quote

import pytest

from flynn_host.client import HostAPIError
from flynn_host.errors import ValidationError
from flynn_host.networking.jobnet import parse_network
from flynn_host.runtime import attach
from flynn_host.types import RESOURCE_BOUNDS

from .conftest import IMAGES, RawResponse, busybox_job, mounts_under, needs_root, raw_request

pytestmark = needs_root


def test_status_tags_and_well_known(make_daemon):
    d = make_daemon(extra_args=["--tags", "disk=ssd,zone=a"])
    status = d.client.status()
    assert status["id"] == d.host_id
    assert status["tags"] == {"disk": "ssd", "zone": "a"}
    assert status["components"] == {"container_backend": "runc", "volumes": "directory"}
    assert d.client.request("GET", "/.well-known/status")["data"]["status"] == "healthy"


def test_resource_check_reports_ports_in_use(daemon):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        with pytest.raises(HostAPIError) as err:
            daemon.client.request(
                "POST", "/host/resource-check",
                {"ports": [{"port": busy, "proto": "tcp"}, {"port": daemon.port + 0}]},
            )  # fmt: skip
        assert err.value.status == 409
        assert err.value.body["detail"]["ports"][0] == {"port": busy, "proto": "tcp"}
    finally:
        taken.close()
    assert daemon.client.request("POST", "/host/resource-check", {"ports": [{"port": busy}]}) == {}
    with pytest.raises(HostAPIError) as err:
        daemon.client.request("POST", "/host/resource-check", {"ports": [{"port": "x"}]})
    assert err.value.body["detail"] == {"field": "ports[0].port"}


def test_force_kills_jobs_an_earlier_daemon_left(make_daemon):
    d = make_daemon()
    job_id = d.new_job_id()
    d.client.add_job(busybox_job(job_id, ["sleep", "60"]))
    d.wait_job(job_id, ("running",))
    d.stop(signal.SIGKILL)  # the job keeps running under its shim
    d.extra_args.append("--force")
    d.start()
    final = d.wait_job(job_id)
    assert final["status"] == "crashed"
    assert d.client.list_jobs(active=True) == {}
    d.wait_cleaned(job_id)
    assert [m for m in mounts_under(d.base) if "/jobs/" in m] == []


def test_attach_to_a_failed_job_gets_its_error(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["true"])
    # under the image directories (file:// URLs elsewhere are refused at once), but missing
    job["mountspecs"][0]["url"] = f"file://{IMAGES}/layers/nonexistent-{job_id}.squashfs"
    job["mountspecs"][0]["id"] = job["mountspecs"][0]["hashes"]["sha512_256"] = "2" * 64
    daemon.client.add_job(job)
    failed = daemon.wait_job(job_id)
    assert failed["status"] == "failed" and "not found" in failed["error"]

    async def try_attach() -> str:
        with pytest.raises(attach.AttachError) as err:
            await attach.attach_host(daemon.url, {"job_id": job_id, "flags": 1 | 16}, daemon.key)
        return str(err.value)

    assert "not found" in asyncio.run(try_attach())
    out = daemon.run_cli("log", "-f", job_id)
    assert out.returncode == 1 and "not found" in out.stderr


def test_log_of_a_job_that_has_logged_nothing_returns_at_once(daemon):
    """`flynn-host log` of a running job with no output yet prints nothing and exits 0 (it
    used to wait 30 s for the job to end, then fail with `attach failed:`)."""
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sleep", "60"]))
    daemon.wait_job(job_id, ("running",))
    started = time.monotonic()
    out = daemon.run_cli("log", job_id)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    assert time.monotonic() - started < 10
    daemon.client.stop_job(job_id)
    daemon.wait_job(job_id)


def test_run_hostnet_and_version_and_usage(daemon):
    # an option of the job's command is the command's, not flynn-host's
    dashed = daemon.run_cli("run", "busybox", "sh", "-c", "echo $0 $1", "-h", "--help")
    assert dashed.returncode == 0 and dashed.stdout == "-h --help\n"
    out = daemon.run_cli("run", "--hostnet", "busybox", "cat", "/proc/net/dev")
    assert out.returncode == 0
    assert "lo:" in out.stdout and len(out.stdout.splitlines()) > 3  # the host's interfaces
    version = daemon.run_cli("version")
    assert version.returncode == 0 and version.stdout.strip() == "0.1.0"
    helped = daemon.run_cli("help", "run")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: flynn-host run [options] [--] <artifact> <command>")
    unknown = daemon.run_cli("frobnicate")
    assert unknown.returncode == 1 and "not a flynn-host command" in unknown.stderr
    top = daemon.run_cli()
    assert top.returncode == 1 and top.stdout.startswith("usage: flynn-host")


def test_discoverd_reports_in_and_jobs_get_its_url(make_daemon):
    d = make_daemon()
    with pytest.raises(HostAPIError) as err:
        d.client.request("POST", "/host/discoverd", {"url": "not a url"})
    assert err.value.body["detail"] == {"field": "url"}
    info = {"job_id": "h-1", "url": "http://127.0.0.1:1111", "dns": "127.0.0.1:53"}
    assert d.client.request("POST", "/host/discoverd", info) == {}
    assert d.client.status()["discoverd"] == info
    job_id = d.new_job_id()
    d.client.add_job(busybox_job(job_id, ["sh", "-c", "echo $DISCOVERD"]))
    d.wait_job(job_id)
    assert d.run_cli("log", job_id).stdout == "http://127.0.0.1:1111\n"
    d.stop()
    d.start()  # the host remembers where discoverd is
    assert d.client.status()["discoverd"] == info


# --- bad input: a clear 4xx, never a 500 or a hang (issue 9, findings 2 and 6) ----------------

JSON_ENDPOINTS = [
    ("PUT", "/host/jobs/some-job"),
    ("POST", "/attach"),
    ("POST", "/host/resource-check"),
    ("POST", "/host/discoverd"),
    ("POST", "/host/network"),
    ("POST", "/host/images"),
    ("POST", "/storage/providers/default/volumes"),
]


def error_of(resp: RawResponse) -> tuple[int, str, str | None]:
    body = resp.json()
    return resp.status, body["code"], (body.get("detail") or {}).get("field")


def test_malformed_bodies_are_syntax_errors(daemon):
    volumes = "/storage/providers/default/volumes"
    # a JSON syntax error, invalid UTF-8, NaN: 500s before the volume API used read_json
    for body in (b"{bad", b'{"meta": {"a": "\xff"}}', b"NaN"):
        assert error_of(raw_request(daemon, "POST", volumes, body)) == (400, "syntax_error", None)
    for method, path in JSON_ENDPOINTS:
        # 100,000 nested arrays made Python's parser raise RecursionError: a 500
        resp = raw_request(daemon, method, path, b"[" * 100_000)
        assert error_of(resp) == (400, "syntax_error", None), (path, resp)
        assert "nested deeper than 64" in resp.json()["message"]
        # a number Python will not convert (over 4300 digits): a ValueError, a 500
        resp = raw_request(daemon, method, path, b"1" * 5000)
        assert error_of(resp) == (400, "syntax_error", None), (path, resp)
        resp = raw_request(daemon, method, path, b" " * (2 << 20))
        assert error_of(resp) == (400, "request_body_too_big", None), (path, resp)
    assert daemon.client.request("GET", "/storage/volumes") == []


def test_resource_check_ports_must_be_port_numbers(daemon):
    for port in (65536, -1, True, 1.5, "80"):
        with pytest.raises(HostAPIError) as err:
            daemon.client.request("POST", "/host/resource-check", {"ports": [{"port": port}]})
        assert (err.value.status, err.value.body["detail"]) == (400, {"field": "ports[0].port"})


def test_event_stream_of_an_unknown_job_is_not_found(daemon):
    # it was a stream that waited for the job forever
    resp = raw_request(daemon, "GET", "/host/jobs/nosuchjob",
                       headers={"Accept": "text/event-stream"}, timeout=5)  # fmt: skip
    assert error_of(resp) == (404, "not_found", None)


def test_attach_requests_are_checked_before_the_upgrade(daemon):
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["echo", "hello"]))
    daemon.wait_job(job_id)
    logs = attach.ATTACH_LOGS | attach.ATTACH_STDOUT
    bad = [({"lines": "3"}, "lines"), ({"lines": True}, "lines"), ({"lines": -1}, "lines"),
           ({"flags": 2**40}, "flags"), ({"flags": True}, "flags"), ({"flags": -1}, "flags"),
           ({"flags": 64}, "flags"), ({"height": 70000}, "height"),
           ({"width": "80"}, "width")]  # fmt: skip
    upgrade = {"Upgrade": "flynn-attach/0", "Connection": "Upgrade"}
    for fields, field in bad:
        body = json.dumps({"job_id": job_id, "flags": logs, **fields}).encode()
        # it was a 101, then a traceback where the frames should be
        resp = raw_request(daemon, "POST", "/attach", body, upgrade)
        assert error_of(resp) == (400, "validation_error", field), fields
    assert daemon.run_cli("log", job_id).stdout == "hello\n"  # a good attach still works


def _job_with(job: dict, path: str, value: object) -> dict:
    """`job` with the field at the dotted `path` set to `value`."""
    *parents, last = path.split(".")
    target = job
    for key in parents:
        target = target.setdefault(key, {}) if not key.isdigit() else target[int(key)]
    target[int(last) if last.isdigit() else last] = value
    return job


# (field path in the job, value, the field the error names): each passed validation and made
# the job fail later (runc, mkfs, execve) or did something else than asked
REFUSED_JOB_VALUES = [
    ("resources.memory", {"limit": True}, "resources.memory.limit"),
    ("resources.memory", {"limit": 10**30}, "resources.memory.limit"),
    ("resources.memory", {"limit": 1024}, "resources.memory.limit"),
    ("resources.cpu", {"limit": 10**7}, "resources.cpu.limit"),
    ("resources.temp_disk", {"limit": 1}, "resources.temp_disk.limit"),
    ("resources.max_fd", {"limit": 3}, "resources.max_fd.limit"),
    ("resources.max_procs", {"limit": 5, "request": 1}, "resources.max_procs.request"),
    ("config.env", {"A\0B": "x"}, "config.env.A\0B"),
    ("config.env", {"A=B": "x"}, "config.env.A=B"),
    ("config.env", {"": "x"}, "config.env."),
    ("config.env", {"A": "x\0y"}, "config.env.A"),
    ("config.env", {"A": "x" * 200_000}, "config.env.A"),
    ("config.args", ["echo", "a\0b"], "config.args[1]"),
    ("config.uid", True, "config.uid"),
    ("config.gid", 2**32, "config.gid"),
    ("config.working_dir", "/tmp\0x", "config.working_dir"),
    ("config.working_dir", "/" + "d" * 4096, "config.working_dir"),
    ("config.ports", [{"port": True}], "config.ports[0].port"),
    ("config.mounts", [{"target": "/m", "location": "/tmp", "writeable": "false"}],
     "config.mounts[0].writeable"),
    ("config.linux_capabilities", ["NOT A CAP"], "config.linux_capabilities[0]"),
    ("mountspecs.0.size", True, "mountspecs[0].size"),
    ("mountspecs.0.size", 2**60, "mountspecs[0].size"),
    ("mountspecs.0.url", "file:///etc/shadow", "mountspecs[0].url"),
    ("mountspecs.0.url", "file:///dev/zero", "mountspecs[0].url"),
    ("resurrect", "false", "resurrect"),
]  # fmt: skip


def test_values_that_would_fail_later_are_refused(daemon):
    for path, value, field in REFUSED_JOB_VALUES:
        job = _job_with(busybox_job(daemon.new_job_id(), ["true"]), path, value)
        with pytest.raises(HostAPIError) as err:
            daemon.client.add_job(job)
        assert (err.value.status, err.value.code) == (400, "validation_error"), (path, value)
        assert err.value.body["detail"] == {"field": field}, (path, value)
    # a job id with a trailing newline matched JOB_ID_RE's `$`
    job_id = daemon.new_job_id() + "\n"
    resp = raw_request(daemon, "PUT", f"/host/jobs/{quote(job_id)}",
                       json.dumps(busybox_job(job_id, ["true"])).encode())  # fmt: skip
    assert error_of(resp) == (400, "validation_error", "id")
    assert daemon.client.list_jobs() == {}


def test_the_smallest_resources_allowed_are_enough_to_run(daemon):
    """The lower bounds are what runc, the kernel and mkfs.ext2 really accept."""
    smallest = {name: {"limit": lo} for name, (lo, _) in RESOURCE_BOUNDS.items()}
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", "echo ok"], resources=smallest))
    final = daemon.wait_job(job_id)
    assert (final["status"], final["exit_status"]) == ("done", 0), final
    assert daemon.run_cli("log", job_id).stdout == "ok\n"


def test_file_urls_of_jobs_name_only_files_in_the_image_dirs(make_daemon, tmp_path):
    d = make_daemon(extra_args=["--image-dir", str(tmp_path / "images")])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "shadow").symlink_to("/etc/shadow")
    for url in (f"file://{tmp_path}/images/shadow", f"file://{tmp_path}/images/../x",
                "file://host/etc/passwd"):  # fmt: skip
        job = busybox_job(d.new_job_id(), ["true"])
        job["mountspecs"][0]["url"] = url
        with pytest.raises(HostAPIError) as err:
            d.client.add_job(job)
        assert err.value.body["detail"] == {"field": "mountspecs[0].url"}, url
    assert d.client.status()["flags"]["image_dirs"] == [str(IMAGES), str(tmp_path / "images")]
    assert d.client.list_jobs() == {}


def test_discoverd_report_is_refused_when_it_would_fail_later(daemon):
    # the URL goes into every job's environment and the host registers at it
    # (port 1: should one be accepted, the host tries to register where nothing listens)
    bad = [({"url": "http://127.0.0.1:1\0"}, "url"), ({"url": "http://127.0.0.1:99999"}, "url"),
           ({"url": "http://"}, "url"), ({"url": "http://127.0.0.1:1\n"}, "url"),
           ({"url": "http://127.0.0.1:1", "dns": "x\0"}, "dns"),
           ({"url": "http://127.0.0.1:1", "job_id": "j" * 5000}, "job_id")]  # fmt: skip
    for body, field in bad:
        with pytest.raises(HostAPIError) as err:
            daemon.client.request("POST", "/host/discoverd", body)
        assert err.value.body["detail"] == {"field": field}, body
    assert daemon.client.status()["discoverd"] is None


def test_network_reports_that_would_take_over_the_host_are_refused():
    # checked without a daemon: if one accepted these it would route them onto a bridge
    for subnet in ("0.0.0.0/0", "10.0.0.0/4", "127.0.0.0/24", "169.254.1.0/24", "224.0.0.0/24",
                   "240.0.0.0/24", "100.100.3.0/31"):  # fmt: skip
        with pytest.raises(ValidationError) as err:
            parse_network({"subnet": subnet})
        assert err.value.field == "subnet", subnet
    for body, field in (({"mtu": True}, "mtu"), ({"mtu": "1500"}, "mtu"),
                        ({"job_id": "a\nb"}, "job_id"), ({"job_id": 5}, "job_id")):  # fmt: skip
        with pytest.raises(ValidationError) as err:
            parse_network({"subnet": "100.100.3.0/24", **body})
        assert err.value.field == field, body
    assert parse_network({"subnet": "100.100.3.0/24", "mtu": 0}) == {
        "job_id": "", "subnet": "100.100.3.0/24", "mtu": 1500}  # fmt: skip


def test_sigterm_ends_event_streams_and_attaches(daemon):
    """Found by the fuzz test: an open event stream kept a SIGTERMed daemon from stopping (for
    more than 100 s), one whose client had left for 30 s, an attach for 60 s."""
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sleep", "60"]))
    daemon.wait_job(job_id, ("running",))
    events = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    events.request("GET", "/host/jobs", headers={**daemon.auth_headers,
                                                "Accept": "text/event-stream"})  # fmt: skip
    stream = events.getresponse()
    left = raw_request(daemon, "GET", f"/host/jobs/{job_id}",
                       headers={"Accept": "text/event-stream"})  # fmt: skip
    assert (stream.status, left.status) == (200, 200)
    body = json.dumps({"job_id": job_id, "flags": attach.ATTACH_STDOUT | attach.ATTACH_STREAM})
    attached = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    head = ["POST /attach HTTP/1.1", "Host: x", "Upgrade: flynn-attach/0",
            "Connection: Upgrade", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in daemon.auth_headers.items())]  # fmt: skip
    attached.sendall(("\r\n".join(head) + "\r\n\r\n" + body).encode())
    assert attached.recv(12) == b"HTTP/1.1 101"
    try:
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(3 + 5) == 0  # the daemon's --stop-timeout is 3 s
        assert time.monotonic() - started < 8
        stream.read()  # the stream ended (EOF), it was not cut mid-event
    finally:
        events.close()
        attached.close()
