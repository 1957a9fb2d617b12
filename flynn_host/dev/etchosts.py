"""A development cluster's names in the machine's /etc/hosts: `controller.<domain>` and
`git.<domain>` resolve to the cluster's first host (its router), so the `flynn` CLI reaches
`https://controller.<domain>` from the machine as from anywhere else. Each line is tagged with
the cluster's name and removed with it; the file is rewritten in place (it may be a bind
mount, which a rename would not replace) under a lock, as several clusters may change it."""

from __future__ import annotations

import fcntl
from pathlib import Path

HOSTS = Path("/etc/hosts")


def lines(path: Path = HOSTS) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def tag(cluster: str) -> str:
    return f"# flynn-cluster {cluster}"


def _rewrite(path: Path, cluster: str, add: str | None) -> None:
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if not line.rstrip("\n").endswith(tag(cluster))]
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        if add is not None:
            kept.append(add)
        if kept != lines:
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def add(cluster: str, ip: str, names: list[str], path: Path = HOSTS) -> None:
    """Map `names` to `ip`, replacing what `cluster` had."""
    _rewrite(path, cluster, f"{ip}\t{' '.join(names)}\t{tag(cluster)}\n")


def remove(cluster: str, path: Path = HOSTS) -> None:
    """Remove `cluster`'s line (nothing there is fine)."""
    if path.exists():
        _rewrite(path, cluster, None)


def cluster_names(domain: str) -> list[str]:
    return [f"controller.{domain}", f"git.{domain}"]
