"""`flynn-host component gitreceive` on a loopback port for gitreceive's tests, on a given
controller and blobstore (no cluster: a push to master fails where it needs hosts to build on);
waited for and always stopped."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev import procs
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
        "PYTHONPATH": procs.import_path(),
    }
    url = f"http://127.0.0.1:{port}"
    argv = procs.component_command("gitreceive")
    with procs.started("gitreceive", argv, env, url + "/.well-known/status") as (_, log):
        yield GitReceive(url, ctl.key, ctl, bs, log)
