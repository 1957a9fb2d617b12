"""A job's open-file limit in its runc spec: what it asked for, unless the host cannot grant
that much (no CAP_SYS_RESOURCE), in which case it gets the host's ceiling rather than a
container that fails to start."""

from __future__ import annotations

import resource

from flynn_host.runtime import bundle
from flynn_host.types import Job

from .test_seccomp import job_json


def nofile(max_fd: int, ceiling: int | None) -> dict[str, int]:
    raw = job_json()
    raw["resources"] = {"max_fd": {"limit": max_fd}}
    job = Job.from_json(raw)
    settings = bundle.HostSettings(
        host_id="h1", cgroup_parent="flynn/h1", init_path="/tini", max_fd_ceiling=ceiling
    )
    spec = bundle.oci_spec(job, settings, "/rootfs", {})
    (limit,) = [r for r in spec["process"]["rlimits"] if r["type"] == "RLIMIT_NOFILE"]
    return {"soft": limit["soft"], "hard": limit["hard"]}


def test_a_job_gets_the_open_files_it_asks_for_up_to_the_hosts_ceiling() -> None:
    assert nofile(65536, None) == {"soft": 65536, "hard": 65536}
    assert nofile(65536, 20000) == {"soft": 20000, "hard": 20000}
    assert nofile(1000, 20000) == {"soft": 1000, "hard": 1000}


def test_the_ceiling_is_this_process_hard_limit_only_without_cap_sys_resource() -> None:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = None if caps & (1 << 24) or hard == resource.RLIM_INFINITY else hard
    assert bundle.max_fd_ceiling() == expected
