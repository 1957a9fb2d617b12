"""Components as jobs: a job from the `components` image runs `flynn-host component ping` from
the host's own code, mounted read-only at /.flynn-host, and answers `/.well-known/status`."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from .conftest import IMAGES, free_port, needs_root

pytestmark = needs_root


@pytest.fixture
def components_image(daemon):
    manifest = IMAGES / "components" / "manifest.json"
    if not manifest.exists():
        pytest.fail(f"{manifest} is missing: run `make images` first")
    return daemon.client.request(
        "POST", "/host/images", {"manifest_url": manifest.as_uri(), "name": "components"}
    )


def status_of(port: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/status") as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_ping_component_runs_from_the_host_bundle(daemon, components_image):
    port = free_port()
    job_id = daemon.new_job_id()
    job = {
        "id": job_id,
        "partition": "system",
        "mountspecs": components_image["mountspecs"],
        "config": {
            "args": ["/.flynn-host/flynn-host", "component", "ping", "--port", str(port)],
            "host_bundle": True,
            "host_network": True,  # so this test reaches it on 127.0.0.1
        },
    }
    daemon.client.add_job(job)
    daemon.wait_job(job_id, ("running",))
    status = status_of(port)["data"]
    assert status["status"] == "healthy"
    # answered from inside the job: its UTS namespace carries the job's hostname
    assert status["detail"] == {**status["detail"], "component": "ping",
                                "hostname": job_id.split("-", 1)[1]}  # fmt: skip
    daemon.client.stop_job(job_id)
    final = daemon.wait_job(job_id)
    assert final["exit_status"] == 0 and final["status"] == "done"
    assert daemon.run_cli("log", job_id).stdout == (
        f"ping: listening on port {port}\nping: stopped\n"
    )


def test_host_bundle_is_read_only_and_only_where_asked(daemon, components_image):
    def run(args: list[str], bundle: bool) -> tuple[dict, str]:
        job_id = daemon.new_job_id()
        config = {"args": args, "host_bundle": bundle}
        daemon.client.add_job(
            {"id": job_id, "mountspecs": components_image["mountspecs"], "config": config}
        )
        return daemon.wait_job(job_id), daemon.run_cli("log", job_id).stdout

    final, out = run(["sh", "-c", "touch /.flynn-host/x 2>&1; /.flynn-host/flynn-host version"],
                     bundle=True)  # fmt: skip
    assert "Read-only file system" in out
    assert out.splitlines()[-1] == "0.1.0"
    final, out = run(["sh", "-c", "test -e /.flynn-host && echo present || echo absent"],
                     bundle=False)  # fmt: skip
    assert out == "absent\n"
