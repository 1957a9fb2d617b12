"""`flynn-host component gitreceive` on a loopback port for gitreceive's tests, on a given
controller and blobstore (no cluster: a push to master fails where it needs hosts to build on);
waited for and always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev.blobstore import BlobstoreProcess
from flynn_host.dev.controller import (
    ControllerProcess,
    PGServer,
)
from flynn_host.dev.host import free_port

# small, so a test can push more than it
MAX_PUSH = 1_000_000


@dataclass
class GitReceive:
    url: str
    key: str
    controller: ControllerProcess
    blobstore: BlobstoreProcess
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def gitreceive_process(
    pg: PGServer, ctl: ControllerProcess, bs: BlobstoreProcess
) -> Iterator[GitReceive]:
    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="flynn-gitreceive-"))
    log = logdir / "gitreceive.log"
    env = {
        **os.environ,
        **pg.env(),
        "PORT": str(port),
        "LISTEN_IP": "127.0.0.1",
        "DISCOVERD": "none",
        "CONTROLLER_URL": ctl.url,
        "CONTROLLER_KEY": ctl.key,
        "BLOBSTORE_URL": bs.url,
        "SLUGBUILDER_IMAGE_URI": "file:///nonexistent/slugbuilder/manifest.json",
        "GITRECEIVE_MAX_PUSH": str(MAX_PUSH),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and Path(p).is_dir()),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "flynn_host.cli.main", "component", "gitreceive"],
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gr = GitReceive(f"http://127.0.0.1:{port}", ctl.key, ctl, bs, log)
    try:
        deadline = time.monotonic() + 30
        while not _answers(gr.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gitreceive did not start:\n{gr.log_text()[-3000:]}")
            time.sleep(0.1)
        yield gr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(logdir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/.well-known/status", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False
