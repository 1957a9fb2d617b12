"""Fixtures for postgres: a real single-member etcd on free loopback ports (discoverd's
`EtcdProcess`), and a temporary volume directory the `postgres` user can reach. Both are
stopped and removed afterwards, whatever the test did."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from flynn_discoverd.etcd import EtcdProcess

from flynn_host.dev.host import etcd_member as temporary_etcd_member


@pytest.fixture
def etcd_member() -> Iterator[EtcdProcess]:
    with temporary_etcd_member("postgres-etcd-") as p:
        yield p


@pytest.fixture
def volume_root() -> Iterator[Path]:
    """A fresh directory for node volumes, traversable by the `postgres` user (tempfile makes
    0700 directories, and PostgreSQL runs as postgres, not root)."""
    root = Path(tempfile.mkdtemp(prefix="flynn-postgres-test-"))
    try:
        os.chmod(root, 0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
