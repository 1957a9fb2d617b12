"""Fixtures for postgres: a real single-member etcd on free loopback ports (discoverd's
`EtcdProcess`), a temporary volume directory the `postgres` user can reach, and running
singleton nodes (etcd, Patroni and PostgreSQL 15 on loopback), one shared by a test module.
All are stopped and removed afterwards, whatever the tests did."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from flynn_discoverd.etcd import EtcdProcess
from postgres_nodes import Node, running_singleton, temporary_volume_root

from flynn_host.dev.host import etcd_member as temporary_etcd_member


@pytest.fixture
def etcd_member() -> Iterator[EtcdProcess]:
    with temporary_etcd_member("postgres-etcd-") as p:
        yield p


@pytest.fixture
def volume_root() -> Iterator[Path]:
    with temporary_volume_root() as root:
        yield root


@pytest.fixture(scope="module")
def singleton_node() -> Iterator[Node]:
    """One singleton node leading its own etcd, for a whole test module, in `available` mode:
    a singleton acknowledges writes alone (in `strict` mode every commit would wait)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (runs postgres as postgres)")
    with (
        temporary_etcd_member("postgres-etcd-") as etcd,
        temporary_volume_root() as root,
        running_singleton(etcd.client_port, root, "pgapi", "available") as node,
    ):
        yield node


@pytest.fixture
def strict_node(singleton_node: Node) -> Iterator[Node]:
    """A second singleton (scope `pgstrict`, the same etcd) in `strict` mode: it leads, but
    with no synchronous standby it acknowledges no commit."""
    with (
        temporary_volume_root() as root,
        running_singleton(singleton_node.etcd_port, root, "pgstrict", "strict") as node,
    ):
        yield node
