"""The `sirenia` strategy's decisions, as pure functions of Patroni's picture and the jobs
(`deploy_sirenia.refusal`, `next_step`, `members_of`): when a deployment is refused, and the
order a 3-node appliance is replaced in (async standby, sync standby, then the primary by a
switchover), never stopping a node while another is not healthy. The strategy on a real
appliance is tested on a 3-host cluster (`test_deploy_system_apps.py`)."""

from __future__ import annotations

from typing import Any

import pytest
from flynn_controller.deploy_sirenia import Job, Member, members_of, next_step, refusal

OLD, NEW = "old-release", "new-release"


def member(name: str, role: str, release: str | None = OLD, state: str = "running",
           lag: int | None = 0, host: str | None = None) -> Member:  # fmt: skip
    return Member(name, name, role, state, None if role == "leader" else lag,
                  f"http://{name}:8008/patroni", release, host or f"h-{name}")  # fmt: skip


def jobs_of(members: list[Member]) -> list[Job]:
    return [Job(m.job_id, m.host_id or "", m.release or "", "up") for m in members if m.release]


def appliance() -> list[Member]:
    return [member("p", "leader"), member("s", "sync_standby"), member("a", "replica")]


def test_a_healthy_appliance_of_three_is_accepted() -> None:
    assert refusal(appliance(), 3, singleton=False) is None


@pytest.mark.parametrize(
    ("members", "count", "singleton", "reason"),
    [
        (appliance()[:1], 1, True, "singleton"),
        (appliance()[:2], 2, False, "at least 3"),
        ([member("p", "leader"), member("s", "sync_standby"), member("s2", "sync_standby")], 3,
         False, "2 synchronous standbys"),
        ([member("p", "leader"), member("a", "replica"), member("b", "replica")], 3, False,
         "0 synchronous standbys"),
        ([member("p", "leader"), member("p2", "leader"), member("s", "sync_standby")], 3, False,
         "2 primaries"),
        (appliance(), 4, False, "asks for 4"),
        (appliance() + [member("b", "replica")], 3, False, "asks for 3"),
        ([member("p", "leader"), member("s", "sync_standby"), member("a", "replica",
          state="starting")], 3, False, "not every node is healthy"),
        ([member("p", "leader"), member("s", "sync_standby"), member("a", "replica",
          lag=50 << 20)], 3, False, "lag 52428800"),
    ],
)  # fmt: skip
def test_refusals_say_why(members: list[Member], count: int, singleton: bool, reason: str) -> None:
    why = refusal(members, count, singleton)
    assert why is not None and reason in why, why


def run_plan(members: list[Member], into: str, target: int = 3) -> list[str]:
    """Play the strategy against a simulated appliance: each start adds a new async standby
    (the 'scheduler' and Patroni at once), each stop removes the node, a switchover swaps the
    roles. Returns the steps taken."""
    counts = {OLD: 3, NEW: 0}
    taken: list[str] = []
    n = 0
    for _ in range(20):
        step = next_step(members, jobs_of(members), into, counts, target)
        assert step.kind != "wait", step.reason
        if step.kind == "done":
            return taken
        if step.kind == "start":
            n += 1
            counts[NEW] += 1
            members = members + [member(f"n{n}", "replica", NEW)]
            taken.append("start")
        elif step.kind == "stop":
            assert step.member is not None and not step.member.leader
            counts[OLD] -= 1
            members = [m for m in members if m.name != step.member.name]
            if step.member.role == "sync_standby":  # Patroni picks a new one among the rest
                i = next(i for i, m in enumerate(members) if m.role == "replica")
                members[i] = member(members[i].name, "sync_standby", members[i].release)
            taken.append(f"stop {step.member.name} ({step.member.role})")
        else:
            assert step.kind == "switchover" and step.member and step.candidate
            assert step.candidate.release == NEW and step.candidate.role == "sync_standby"
            members = [
                member(m.name, "leader", m.release) if m is step.candidate
                else member(m.name, "sync_standby", m.release) if m is step.member
                else m
                for m in members
            ]  # fmt: skip
            taken.append(f"switchover {step.member.name} -> {step.candidate.name}")
    raise AssertionError(f"no end: {taken}")


def test_asyncs_first_then_the_sync_then_the_primary_by_switchover() -> None:
    assert run_plan(appliance(), NEW) == [
        "start", "stop a (replica)",
        "start", "stop s (sync_standby)",
        "start", "switchover p -> n1", "stop p (sync_standby)",
    ]  # fmt: skip


def test_nothing_is_stopped_while_a_node_is_not_healthy() -> None:
    members = appliance() + [member("n1", "replica", NEW, state="starting", lag=None)]
    step = next_step(members, jobs_of(members), NEW, {OLD: 3, NEW: 1}, 3)
    assert step.kind == "wait" and "n1" in step.reason
    behind = appliance() + [member("n1", "replica", NEW, lag=5 << 20)]
    assert next_step(behind, jobs_of(behind), NEW, {OLD: 3, NEW: 1}, 3).kind == "wait"


def test_a_new_job_must_join_before_anything_else() -> None:
    members = appliance()
    jobs = jobs_of(members) + [Job("n1", "h1", NEW, "up")]
    step = next_step(members, jobs, NEW, {OLD: 3, NEW: 1}, 3)
    assert step.kind == "wait" and "n1" in step.reason and "joined" in step.reason


def test_a_stopped_members_leftover_key_is_no_reason_to_wait() -> None:
    members = [member("p", "leader"), member("s", "sync_standby"), member("n1", "replica", NEW),
               member("a", "replica", release=None, state="stopped", lag=None)]  # fmt: skip
    assert next_step(members, jobs_of(members), NEW, {OLD: 2, NEW: 1}, 3).kind == "start"


def test_no_old_node_stops_while_a_new_one_is_missing() -> None:
    # the new node crashed (no running job): stopping an old one would shrink the appliance
    members = appliance()
    step = next_step(members, jobs_of(members), NEW, {OLD: 3, NEW: 1}, 3)
    assert step.kind == "wait" and "not joined" in step.reason


def test_moving_back_starts_what_the_old_release_misses() -> None:
    members = [member("p", "leader"), member("s", "sync_standby")]
    assert next_step(members, jobs_of(members), OLD, {OLD: 2, NEW: 0}, 3).kind == "start"


def test_a_replaced_node_that_never_joined_goes_first() -> None:
    # rolling back: the new release's node crashes and never joined
    members = appliance()
    jobs = jobs_of(members) + [Job("n1", "h1", NEW, "starting")]
    step = next_step(members, jobs, OLD, {OLD: 3, NEW: 1}, 3)
    assert step.kind == "stop" and step.member is not None and step.member.job_id == "n1"
    # ... or is down, waiting for its restart: its slot goes
    assert next_step(members, jobs_of(members), OLD, {OLD: 3, NEW: 1}, 3).kind == "drop"
    # (going forward, an old node down waiting for its restart makes room for a new one)
    two = appliance()[:2]
    assert next_step(two, jobs_of(two), NEW, {OLD: 3, NEW: 1}, 3).kind == "drop"


def test_no_primary_means_wait() -> None:
    members = [member("s", "sync_standby"), member("a", "replica")]
    step = next_step(members, jobs_of(members), NEW, {OLD: 3, NEW: 0}, 3)
    assert step.kind == "wait" and "no running primary" in step.reason


def test_the_switchover_waits_for_a_new_sync_standby() -> None:
    members = [member("p", "leader"), member("n1", "replica", NEW), member("n2", "replica", NEW),
               member("n3", "replica", NEW)]  # fmt: skip
    step = next_step(members, jobs_of(members), NEW, {OLD: 1, NEW: 3}, 3)
    assert step.kind == "wait" and "synchronous standby" in step.reason


def test_rolling_back_is_the_same_walk_with_the_roles_swapped() -> None:
    # the old primary still leads; two new standbys joined, one old standby is left
    members = [member("p", "leader"), member("s", "sync_standby"), member("n1", "replica", NEW),
               member("n2", "replica", NEW)]  # fmt: skip
    step = next_step(members, jobs_of(members), OLD, {OLD: 2, NEW: 2}, 3)
    assert step.kind == "stop" and step.member is not None and step.member.name == "n1"


def test_members_get_their_jobs_release_and_host() -> None:
    cluster: dict[str, Any] = {"members": [
        {"name": "h1-a", "role": "leader", "state": "running", "api_url": "http://x:8008/patroni"},
        {"name": "node-b", "role": "replica", "state": "streaming", "lag": 0},
        {"name": "h3-c", "role": "replica", "state": "running", "lag": "unknown"},
    ]}  # fmt: skip
    jobs = [Job("h1-a", "h1", OLD, "up"), Job("h2-b", "h2", NEW, "up")]
    found = {m.name: m for m in members_of(cluster, jobs, {"node-b": "h2-b"})}
    assert (found["h1-a"].release, found["h1-a"].host_id) == (OLD, "h1")
    assert (found["node-b"].job_id, found["node-b"].release, found["node-b"].healthy) == (
        "h2-b", NEW, True)  # fmt: skip
    assert found["h3-c"].release is None and found["h3-c"].lag is None
    assert not found["h3-c"].healthy
