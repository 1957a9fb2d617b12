"""Host-level API and CLI: status, tags, resource checks, `--force`, attach to a failed job,
and the command's own usage texts."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest

from flynn_host import attach
from flynn_host.client import HostAPIError

from .conftest import IMAGES, busybox_job, mounts_under, needs_root

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
            await attach.attach_host(daemon.url, {"job_id": job_id, "flags": 1 | 16})
        return str(err.value)

    assert "not found" in asyncio.run(try_attach())
    out = daemon.run_cli("log", "-f", job_id)
    assert out.returncode == 1 and "not found" in out.stderr


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
