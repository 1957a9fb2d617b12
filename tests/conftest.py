"""Shared fixtures: the busybox test image, and real `flynn-host daemon` processes with their
own ports, state, work, run, volume and log directories (`flynn_host.devhost`), torn down
completely even when a test fails."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flynn_host import devhost, images
from flynn_host.devhost import (  # noqa: F401  (re-exported for the test modules)
    IMAGES,
    ROOT,
    Daemon,
    busybox_job,
    cgroups_of,
    free_port,
    mounts_under,
    remove_cgroups,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, runc)")


@pytest.fixture(scope="session")
def busybox_manifest() -> Path:
    return images.build_busybox_image(IMAGES)


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
