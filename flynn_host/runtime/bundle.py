"""From a Flynn job to an OCI runtime spec: the environment flynn-host injects
(README.md#what-a-job-gets), namespaces, mounts, capabilities, cgroup resources and rlimits.

A pure function of the job and the host's settings, so it is tested without starting anything.
PID 1 in every container is tini (Debian's `tini-static`, bind-mounted read-only at
`/.containerinit` as Flynn mounted its own init): it forwards signals to the job's process
group (`-g`), so they reach the job's children too, not only its first process, and it reaps
zombies, so a plain `sleep` stops on SIGTERM instead of waiting for SIGKILL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flynn_host.runtime import seccomp
from flynn_host.types import SYSTEM_PARTITION, Job

CONTAINER_INIT = "/.containerinit"
# where a job with `config.host_bundle` finds the host's own flynn-host program (read-only)
HOST_BUNDLE = "/.flynn-host"

# Flynn's default capability set (host/types/defaults.go); host-network jobs add NET_ADMIN.
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM": "xterm",
    "HOME": "/",
}

SHM_BYTES = 64 * 1024 * 1024


@dataclass
class HostSettings:
    """What the bundle needs to know about the host running the job."""

    host_id: str
    cgroup_parent: str
    init_path: str
    external_ip: str = ""
    listen_ip: str = ""
    job_ip: str = ""
    # the job's network namespace, made by the host; empty: runc makes one (loopback only)
    netns: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # the most open files a job can be given (see `max_fd_ceiling`); None: no ceiling
    max_fd_ceiling: int | None = None


def max_fd_ceiling() -> int | None:
    """Without CAP_SYS_RESOURCE (an unprivileged or restricted host), runc cannot raise a
    job's RLIMIT_NOFILE above flynn-host's own hard limit, and the job would fail to start:
    that limit is then the ceiling. With it, fs.nr_open is the kernel's own ceiling."""
    import resource

    cap_sys_resource = 1 << 24
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        caps = 0
    if caps & cap_sys_resource:
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def job_env(job: Job, host: HostSettings) -> dict[str, str]:
    """Flynn's order: base, host defaults, job env, then HOSTNAME and the port variables."""
    env = dict(BASE_ENV)
    env.update(host.env)
    if host.external_ip:
        env["EXTERNAL_IP"] = host.external_ip
    if host.listen_ip:
        env["LISTEN_IP"] = host.listen_ip
    if host.job_ip and not job.config.get("host_network"):
        env["EXTERNAL_IP"] = host.job_ip
    env.update(job.config.get("env") or {})
    env["HOSTNAME"] = job.hostname
    for i, port in enumerate(job.config.get("ports") or []):
        number = port.get("port") or 5000 + i
        port["port"] = number
        if i == 0:
            env["PORT"] = str(number)
        env[f"PORT_{i}"] = str(number)
    return env


def ro_bind(source: Path | str, target: Path | str) -> dict[str, Any]:
    """A read-only recursive bind mount of the host's `source` at the container's `target`."""
    return {"destination": str(target), "type": "bind", "source": str(source),
            "options": ["rbind", "ro"]}  # fmt: skip


def _mount(dest: str, mtype: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "type": mtype, "source": source, "options": options}


def _base_mounts() -> list[dict[str, Any]]:
    return [
        _mount("/proc", "proc", "proc", []),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/pts", "devpts", "devpts",
               ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        _mount("/dev/shm", "tmpfs", "shm",
               ["nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_BYTES}"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup",
               ["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ]  # fmt: skip


def oci_spec(
    job: Job,
    host: HostSettings,
    rootfs: str,
    volume_paths: dict[str, str],
    extra_mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The runc `config.json` for `job`; `volume_paths` maps volume id to its host directory."""
    cfg = job.config
    env = job_env(job, host)
    caps = list(DEFAULT_CAPABILITIES)
    if job.partition != SYSTEM_PARTITION:
        # raw packets would bypass the netfilter fence of a user job's namespace (see
        # jobnet.sandbox_netns); ping still works through unprivileged ICMP sockets
        caps.remove("CAP_NET_RAW")
    if cfg.get("host_network"):
        caps.append("CAP_NET_ADMIN")
    caps += [c for c in cfg.get("linux_capabilities") or [] if c not in caps]

    mounts = _base_mounts()
    mounts.append(_mount(CONTAINER_INIT, "bind", host.init_path, ["bind", "ro"]))
    for m in cfg.get("mounts") or []:
        opts = ["rbind", "rw" if m.get("writeable") else "ro"]
        mounts.append(_mount(m["target"], "bind", m["location"], opts))
    for v in cfg.get("volumes") or []:
        opts = ["rbind", "rw" if v.get("writeable", True) else "ro"]
        mounts.append(_mount(v["target"], "bind", volume_paths[v["volume"]], opts))
    mounts += extra_mounts or []

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not cfg.get("host_network"):
        namespaces.append({"type": "network", **({"path": host.netns} if host.netns else {})})

    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    memory = job.limit("memory")
    if memory:
        # no swap: the limit is what the job gets, as Flynn's memory limit was
        resources["memory"] = {"limit": memory, "swap": memory}
    cpu = job.limit("cpu")
    if cpu:
        resources["cpu"] = {"shares": max(2, cpu * 1024 // 1000)}
    max_procs = job.limit("max_procs")
    if max_procs:
        # the pids cgroup, not RLIMIT_NPROC: that rlimit counts every process of the uid on
        # the whole host, so for a root container it would refuse even the first fork
        resources["pids"] = {"limit": max_procs}

    rlimits = []
    max_fd = job.limit("max_fd")
    if max_fd and host.max_fd_ceiling is not None:
        max_fd = min(max_fd, host.max_fd_ceiling)
    if max_fd:
        rlimits.append({"type": "RLIMIT_NOFILE", "hard": max_fd, "soft": max_fd})

    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": bool(cfg.get("tty")),
            # a program that asks its size at once must not see 0x0; attach resizes later
            **({"consoleSize": {"height": 24, "width": 80}} if cfg.get("tty") else {}),
            "user": {"uid": cfg.get("uid") or 0, "gid": cfg.get("gid") or 0},
            # -g: a signal for the job goes to its whole process group (a shell's children
            # too), as a terminal's Ctrl-C does; see `flynn_host.runtime.shim` for SIGSTOP/SIGCONT
            "args": [CONTAINER_INIT, "-g", "--", *cfg["args"]],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cfg.get("working_dir") or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": rlimits,
            # setuid programs cannot gain privileges the job was not given (a job may ask
            # otherwise with `config.no_new_privileges: false`)
            "noNewPrivileges": cfg.get("no_new_privileges", True),
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": job.hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": f"/{host.cgroup_parent}/{job.partition}/{job.id}",
            "resources": resources,
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
            # `unconfined` only for system jobs (flynn_host.types checks that)
            **({} if cfg.get("seccomp") == seccomp.UNCONFINED
               else {"seccomp": seccomp.default_profile()}),
        },
    }  # fmt: skip
