"""The pure parts of following discoverd and Patroni: etcd endpoints from discoverd's peers,
the role an instance shows, the leader rule (`decide`) as a table, the switchover candidate
and the mode patch; and the clear error when the node has neither etcd nor discoverd."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from flynn_postgres.discovery import (
    MASTER,
    Action,
    decide,
    etcd_hosts_from_peers,
    instance_role,
)
from flynn_postgres.patroni import NodeState, healthy_sync_standby, mode_patch

from flynn_host.dev.host import free_ports

ME, OTHER = "me-id", "other-id"
PRIMARY = NodeState("master", "running", leader=True)


def test_etcd_endpoints_are_discoverd_ports_plus_1268() -> None:
    peers = ["http://10.0.0.1:1111", "10.0.0.2:1111", "10.0.0.3", "http://[fd00::3]:1111/"]
    assert etcd_hosts_from_peers(peers) == [
        "10.0.0.1:2379",
        "10.0.0.2:2379",
        "10.0.0.3:2379",
        "[fd00::3]:2379",
    ]
    # duplicates once, nonsense skipped
    assert etcd_hosts_from_peers(["10.0.0.1:1111", "http://10.0.0.1:1111", ":x", ""]) == [
        "10.0.0.1:2379"
    ]


@pytest.mark.parametrize(
    ("state", "role"),
    [
        (PRIMARY, MASTER),
        (NodeState("primary", "running", leader=True), MASTER),  # Patroni >= 3.0.3's word
        (NodeState("replica", "running"), "replica"),
        (NodeState("replica", "starting"), "replica"),
        # PostgreSQL still a primary, but Patroni no longer holds the leader key: demoting
        (NodeState("master", "running", leader=False), None),
        # Patroni holds the key, PostgreSQL not yet promoted or already stopping
        (NodeState("replica", "running", leader=True), "replica"),
        (NodeState("master", "stopping", leader=True), None),
        (NodeState("", "stopped"), None),
        (None, None),  # Patroni does not answer
    ],
)
def test_instance_role(state: NodeState | None, role: str | None) -> None:
    assert instance_role(state) == role


# (role now, registered as, discoverd's leader, stopping) -> action
LEADER_RULE = [
    # the primary registers, leads, and shows itself as master
    ((MASTER, None, None, False), Action.REGISTER),
    ((MASTER, None, OTHER, False), Action.REGISTER),
    ((MASTER, MASTER, OTHER, False), Action.SET_LEADER),
    ((MASTER, MASTER, None, False), Action.SET_LEADER),
    ((MASTER, "replica", OTHER, False), Action.SET_LEADER),
    ((MASTER, "replica", ME, False), Action.UPDATE_META),
    ((MASTER, MASTER, ME, False), Action.NONE),
    # a stopping primary takes nothing new on
    ((MASTER, None, None, True), Action.NONE),
    ((MASTER, MASTER, ME, True), Action.NONE),
    # no longer the primary (demoted, fenced, stopping, Patroni silent): leave at once
    (("replica", MASTER, ME, False), Action.STEP_DOWN),
    (("replica", MASTER, OTHER, False), Action.STEP_DOWN),
    ((None, MASTER, ME, False), Action.STEP_DOWN),
    ((None, MASTER, None, True), Action.STEP_DOWN),
    (("replica", "replica", ME, False), Action.STEP_DOWN),
    # a replica joins only once another instance leads: its id may still be the leader key
    (("replica", None, None, False), Action.NONE),
    (("replica", None, OTHER, False), Action.REGISTER),
    (("replica", None, OTHER, True), Action.NONE),
    ((None, None, OTHER, False), Action.NONE),
    # a registered replica keeps its role up to date, and stays while Patroni is silent
    (("replica", "replica", OTHER, False), Action.NONE),
    (("standby_leader", "replica", OTHER, False), Action.UPDATE_META),
    ((None, "replica", OTHER, False), Action.NONE),
    (("replica", "replica", None, True), Action.NONE),
]


@pytest.mark.parametrize(("given", "action"), LEADER_RULE)
def test_leader_rule(
    given: tuple[str | None, str | None, str | None, bool], action: Action
) -> None:
    role, registered, leader, stopping = given
    assert decide(role, registered, leader, ME, stopping) is action


def test_only_the_primary_ever_sets_the_leader() -> None:
    """Over every combination: SET_LEADER only for the primary, and never for a node that is
    leaving; a non-primary that may be the leader always steps down."""
    roles = [MASTER, "replica", None]
    for role in roles:
        for registered in [*roles]:
            for leader in (ME, OTHER, None):
                for stopping in (False, True):
                    action = decide(role, registered, leader, ME, stopping)
                    if action is Action.SET_LEADER:
                        assert role == MASTER and not stopping
                    if role != MASTER and registered is not None and leader == ME:
                        assert action is Action.STEP_DOWN


def member(name: str, role: str, state: str = "running", lag: Any = 0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "role": role, "state": state, "lag": lag, **kw}


@pytest.mark.parametrize(
    ("members", "candidate"),
    [
        ([member("a", "leader"), member("b", "sync_standby"), member("c", "replica")], "b"),
        ([member("a", "leader"), member("b", "sync_standby", "streaming")], "b"),
        # an async replica is no candidate: only the sync standby surely has every commit
        ([member("a", "leader"), member("c", "replica")], None),
        ([member("a", "leader"), member("b", "sync_standby", "starting")], None),
        ([member("a", "leader"), member("b", "sync_standby", lag="unknown")], None),
        ([member("a", "leader"), member("b", "sync_standby", lag=64 * 1024 * 1024)], None),
        ([member("a", "leader"), member("b", "sync_standby", tags={"nofailover": True})], None),
        ([], None),
    ],
)
def test_switchover_candidate(members: list[dict[str, Any]], candidate: str | None) -> None:
    assert healthy_sync_standby({"members": members}, "a") == candidate


def test_mode_patch() -> None:
    strict = {"synchronous_mode": True, "synchronous_mode_strict": True, "ttl": 10}
    available = {**strict, "synchronous_mode_strict": False}
    assert mode_patch("strict", strict) is None
    assert mode_patch("available", available) is None
    assert mode_patch("available", strict) == {
        "synchronous_mode": True,
        "synchronous_mode_strict": False,
    }
    assert mode_patch("strict", available) == {
        "synchronous_mode": True,
        "synchronous_mode_strict": True,
    }
    assert mode_patch("strict", {}) == {"synchronous_mode": True, "synchronous_mode_strict": True}


def test_no_etcd_and_no_discoverd_is_a_clear_error(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres",
         "--data-dir", str(tmp_path / "vol"), "--etcd", "", "--discoverd", ""],
        env={"PATH": "/usr/bin:/bin", "POSTGRES_SUPERUSER_PASSWORD": "x",
             "POSTGRES_REPLICATION_PASSWORD": "y"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "no etcd endpoints: give --etcd or POSTGRES_ETCD" in out.stderr
    assert "or --discoverd or DISCOVERD" in out.stderr
    assert not (tmp_path / "vol").exists()


def test_a_discoverd_that_never_answers_is_a_clear_error(tmp_path: Any) -> None:
    (port,) = free_ports(1)
    out = subprocess.run(
        [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres",
         "--data-dir", str(tmp_path / "vol"), "--etcd", "",
         "--discoverd", f"http://127.0.0.1:{port}", "--discovery-timeout", "1"],
        env={"PATH": "/usr/bin:/bin", "POSTGRES_SUPERUSER_PASSWORD": "x",
             "POSTGRES_REPLICATION_PASSWORD": "y"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert f"no etcd endpoints from discoverd (http://127.0.0.1:{port}) within 1s" in out.stderr
    assert "waiting for discoverd to list its etcd members" in out.stderr
    assert not (tmp_path / "vol").exists()
