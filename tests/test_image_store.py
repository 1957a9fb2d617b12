"""The host's image store: import (path and HTTP), list, run by name, corruption and missing
layers refused by hash, garbage collection of unused layers."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from flynn_host.client import HostAPIError

from .conftest import IMAGES, busybox_job, needs_root

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


def test_layer_corrupted_in_the_cache_is_caught_at_next_use(make_daemon, image_copy):
    d = make_daemon()
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
