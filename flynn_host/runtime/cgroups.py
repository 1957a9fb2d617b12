"""A host's cgroups: where its jobs' cgroups are in every hierarchy (the cgroup v1 controllers
or the v2 root), Flynn's partitions with their CPU shares, and their removal.

A job's cgroup is `<cgroup parent>/<partition>/<job id>` (`flynn/<host id>/user/<job id>`) in
every hierarchy: runc makes and removes it from the bundle's `cgroupsPath`; the runc backend
makes the partitions at start-up, reads a job's OOM count in its cgroup and removes what is
empty when it stops. The development tools (`flynn_host.dev`) find and remove whatever a host
left, by the same names.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from flynn_host.config import HostConfig
from flynn_host.types import PARTITIONS

CGROUP_ROOT = Path("/sys/fs/cgroup")


def hierarchies() -> list[Path]:
    """Every cgroup hierarchy a job's cgroup appears in (v1 controllers, or the v2 root)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    out = []
    for entry in sorted(CGROUP_ROOT.iterdir()):
        if entry.is_dir() and (entry / "cgroup.procs").exists() and entry.name != "unified":
            out.append(entry)
    return out


def job_dirs(cgroup_parent: str, job_id: str) -> list[Path]:
    """Where the job's cgroup may be, in every hierarchy: under its partition, which only the
    job's spec says, so under each (the id is unique, so at most one exists)."""
    return [h / cgroup_parent / p / job_id for h in hierarchies() for p in PARTITIONS]


def oom_killed(dirs: list[Path]) -> bool:
    """True if the kernel's OOM killer killed a process of the cgroup (`oom_kill` counted in
    v1's `memory.oom_control` or v2's `memory.events`)."""
    for d in dirs:
        for name in ("memory.oom_control", "memory.events"):
            with contextlib.suppress(OSError):
                for line in (d / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
    return False


def setup_partitions(config: HostConfig) -> None:
    """Flynn's mandatory partitions, as cgroups with their CPU shares (weight on cgroup v2)."""
    for name, shares in config.partitions.items():
        for h in hierarchies():
            d = h / config.cgroup_parent / name
            d.mkdir(parents=True, exist_ok=True)
            if (d / "cpu.shares").exists():
                (d / "cpu.shares").write_text(str(shares))
            elif (d / "cpu.weight").exists():
                (d / "cpu.weight").write_text(str(max(1, min(10000, shares * 100 // 1024))))


def remove_empty_cgroups(config: HostConfig) -> None:
    """Remove this host's partition cgroups (and the shared `flynn` parent) where empty, also
    in the hybrid layout's `unified` hierarchy, where runc mirrors the job cgroups."""
    unified = [CGROUP_ROOT / "unified"] if (CGROUP_ROOT / "unified").is_dir() else []
    for h in hierarchies() + unified:
        base = h / config.cgroup_parent
        if not base.exists():
            continue
        for d in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()
        for d in (base, base.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def cgroups_of(rel: str) -> list[Path]:
    """Every cgroup at `rel` (such as `flynn/<host id>`) and below it, in any hierarchy under
    the cgroup root (the hybrid layout's `unified` one too): what a host left."""
    found = []
    for h in CGROUP_ROOT.iterdir():
        d = h / rel
        if d.exists():
            # os.walk skips what vanishes while it walks (a job's cgroup removed meanwhile)
            found += [Path(top) / sub for top, subs, _ in os.walk(d) for sub in subs] + [d]
    return found


def remove_cgroups(rel: str) -> None:
    """Remove the cgroups at `rel` and below, deepest first, and the shared `flynn` parent
    where empty. A cgroup that still has a process stays."""
    for d in sorted(cgroups_of(rel), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    for h in CGROUP_ROOT.iterdir():
        with contextlib.suppress(OSError):
            (h / "flynn").rmdir()
