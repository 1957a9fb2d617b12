"""The host's image store: import (path and HTTP), list, run by name, corruption and missing
layers refused by hash, garbage collection of unused layers, and manifests read only from the
image directories and with caps."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from flynn_host import limits
from flynn_host.client import HostAPIError

from ..conftest import IMAGES, RawResponse, busybox_job, needs_root, raw_request, rss_bytes

pytestmark = needs_root


@pytest.fixture
def image_copy(tmp_path: Path, busybox_manifest: Path) -> Path:
    """A private copy of the busybox image directory (layout <dir>/busybox, <dir>/layers)."""
    out = tmp_path / "images"
    shutil.copytree(IMAGES / "busybox", out / "busybox")
    (out / "layers").mkdir()
    for layer in json.loads((out / "busybox" / "manifest.json").read_text())["rootfs"][0]["layers"]:
        name = f"{layer['id']}.squashfs"
        shutil.copy(IMAGES / "layers" / name, out / "layers" / name)
    return out


@pytest.fixture
def daemon(make_daemon, image_copy: Path):
    """A daemon that may read the private image copy: file:// URLs may name only files under
    the image directories."""
    return make_daemon(extra_args=["--image-dir", str(image_copy)])


def only_layer(images_dir: Path) -> Path:
    (layer,) = (images_dir / "layers").glob("*.squashfs")
    return layer


def test_import_list_and_run_by_name(daemon, image_copy):
    out = daemon.run_cli("image", "import", str(image_copy / "busybox" / "manifest.json"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("imported busybox: id ")
    listing = daemon.run_cli("image", "list").stdout.splitlines()
    assert listing[0].split()[:3] == ["NAME", "ID", "LAYERS"]
    assert listing[1].split()[0] == "busybox" and listing[1].split()[2] == "1"
    # the image is the host's now: no local image directory needed to run it
    env = {**daemon.cli_env, "FLYNN_IMAGES": "/nonexistent"}
    shutil.rmtree(image_copy)
    ran = daemon.run_cli("run", "busybox", "sh", "-c", "echo from the store", env=env)
    assert (ran.returncode, ran.stdout) == (0, "from the store\n"), ran.stderr
    image = daemon.client.request("GET", "/host/images/busybox")
    assert image["mountspecs"][0]["url"].startswith(f"file://{daemon.base}/vol/layers/")


def test_import_with_a_name_given_before_the_manifest(daemon, image_copy):
    manifest = str(image_copy / "busybox" / "manifest.json")
    out = daemon.run_cli("image", "import", "--name=tiny", manifest)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("imported tiny: id ")
    assert daemon.run_cli("image", "import", "--name=tiny").returncode == 2


def test_import_over_http(daemon, image_copy):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_copy))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/busybox/manifest.json"
        image = daemon.client.request("POST", "/host/images", {"manifest_url": url, "name": "bb"})
    finally:
        server.shutdown()
        server.server_close()
    assert image["name"] == "bb" and image["source"] == url
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["true"])
    job["mountspecs"] = image["mountspecs"]
    daemon.client.add_job(job)
    assert daemon.wait_job(job_id)["status"] == "done"


def test_corrupt_or_missing_layer_is_refused(daemon, image_copy):
    layer = only_layer(image_copy)
    layer_id = layer.name.removesuffix(".squashfs")
    data = bytearray(layer.read_bytes())
    data[4096] ^= 0x01
    layer.write_bytes(bytes(data))
    manifest = str(image_copy / "busybox" / "manifest.json")
    out = daemon.run_cli("image", "import", manifest)
    assert out.returncode == 1
    assert "sha512_256" in out.stderr and layer_id[:16] in out.stderr
    assert daemon.client.request("GET", "/host/images") == []
    assert not (daemon.base / "vol" / "layers" / layer.name).exists()
    layer.unlink()
    out = daemon.run_cli("image", "import", manifest)
    assert out.returncode == 1 and f"layer {layer_id} not found" in out.stderr


def test_layer_corrupted_in_the_cache_is_caught_at_next_use(daemon, image_copy):
    d = daemon
    assert (
        d.run_cli("image", "import", str(image_copy / "busybox" / "manifest.json")).returncode == 0
    )
    cached = next((d.base / "vol" / "layers").glob("*.squashfs"))
    d.stop()
    data = bytearray(cached.read_bytes())
    data[8192] ^= 0x01
    cached.write_bytes(bytes(data))
    d.start()  # a new process checks each cached layer's bytes once, at first use
    ran = d.run_cli("run", "busybox", "true", env={**d.cli_env, "FLYNN_IMAGES": "/nonexistent"})
    assert ran.returncode == 1
    (job,) = d.client.list_jobs().values()
    assert job["status"] == "failed" and "corrupted" in job["error"]


def test_gc_removes_only_unused_layers(daemon, image_copy):
    assert (
        daemon.run_cli("image", "import", str(image_copy / "busybox" / "manifest.json")).returncode
        == 0
    )
    cache = daemon.base / "vol" / "layers"
    assert daemon.run_cli("image", "gc").stdout == "removed 0 unused layers\n"
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sleep", "60"])
    job["mountspecs"] = daemon.client.request("GET", "/host/images/busybox")["mountspecs"]
    daemon.client.add_job(job)
    daemon.wait_job(job_id, ("running",))
    assert daemon.run_cli("image", "rm", "busybox").returncode == 0
    # the image is gone but a running job still uses its layer
    assert daemon.run_cli("image", "gc").stdout == "removed 0 unused layers\n"
    daemon.client.stop_job(job_id)
    daemon.wait_job(job_id)
    assert daemon.run_cli("image", "gc").stdout == "removed 1 unused layers\n"
    assert list(cache.glob("*.squashfs")) == []
    with pytest.raises(HostAPIError) as err:
        daemon.client.request("GET", "/host/images/busybox")
    assert err.value.status == 404


def import_or_kill(d, manifest_url: str, timeout: float = 5.0) -> RawResponse:
    """POST /host/images; a daemon that does not answer in time is killed at once, so that a
    daemon reading without end (what this guards against) cannot eat the machine's memory."""
    body = json.dumps({"manifest_url": manifest_url}).encode()
    try:
        return raw_request(d, "POST", "/host/images", body, timeout=timeout)
    except TimeoutError:
        d.stop(signal.SIGKILL)
        raise


def test_manifest_reads_are_capped_and_only_from_image_dirs(daemon, image_copy):
    # issue 9, finding 2: file:///dev/zero grew the daemon by ~330 MB/s until it was killed
    os.mkfifo(image_copy / "fifo")
    (image_copy / "passwd").symlink_to("/etc/passwd")
    (image_copy / "big.json").write_text(" " * (limits.MAX_MANIFEST + 1))
    (image_copy / "deep.json").write_text("[" * 100_000)
    refused = {
        "file:///dev/zero": "not under the image directories",
        "file:///etc/shadow": "not under the image directories",
        str(image_copy / "passwd"): "not under the image directories",
        f"file://{image_copy}/../../etc/shadow": "not under the image directories",
        str(image_copy / "fifo"): "not a regular file",
        str(image_copy / "big.json"): f"larger than {limits.MAX_MANIFEST} bytes",
        str(image_copy / "deep.json"): "nested deeper than 64",
    }
    for url, why in refused.items():
        resp = import_or_kill(daemon, url)
        assert resp.status == 400 and why in resp.json()["message"], (url, resp)
    assert rss_bytes(daemon.proc.pid) < 200 * 1024 * 1024
    assert daemon.client.request("GET", "/host/images") == []


def test_malformed_manifests_are_validation_errors(daemon, image_copy):
    manifest = json.loads((image_copy / "busybox" / "manifest.json").read_text())
    rootfs = manifest["rootfs"][0]
    # each was a 500: an AttributeError, or canonical JSON's TypeError for a float
    shapes = {
        "rootfs": {**manifest, "rootfs": "x"},
        "layers": {**manifest, "rootfs": [{**rootfs, "layers": [1]}]},
        "hashes": {**manifest, "rootfs": [{**rootfs, "layers": [{"hashes": [], "length": 1}]}]},
        "floats": {**manifest, "meta": {"x": 1.5}},
    }
    for name, body in shapes.items():
        path = image_copy / f"{name}.json"
        path.write_text(json.dumps(body))
        resp = import_or_kill(daemon, str(path))
        assert (resp.status, resp.json()["code"]) == (400, "validation_error"), (name, resp)


def test_manifest_downloads_are_capped(daemon):
    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                while True:
                    self.wfile.write(b" " * 65536)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m/manifest.json"
        resp = import_or_kill(daemon, url)
    finally:
        server.shutdown()
        server.server_close()
    assert resp.status == 400, resp
    assert f"larger than {limits.MAX_MANIFEST} bytes" in resp.json()["message"]
    assert rss_bytes(daemon.proc.pid) < 200 * 1024 * 1024
