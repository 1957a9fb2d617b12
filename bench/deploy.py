"""`git push flynn master` of the Node.js example (`examples/nodejs`) → the first 200 through
the router, cold and warm, next to the same work done without the platform in the same run:
`git push` to a bare repository plus the same app started directly with `flynn-host run` on
one of the cluster's hosts; and the idle memory of the whole platform. Once per cluster size
(`--hosts 1,3`).

* **platform**: `bench/build.py`'s pushes (its helpers, imported): `flynn create -y`, the
  cold push of a fresh copy of the example (a new app, no build cache) until the first 200
  with the example's page, then the app's strategy set to `one-by-one` and the warm push of a
  one-line change to `server.js` until the first 200 with the change. Both the push's wall
  time and push → first 200 are reported.
* **reference**: the same example in its own git work tree, `git push` over file:// to a
  bare repository (`git init --bare`) in the scratch directory, `git archive` of the pushed
  commit into a fresh source directory (as the receiver hands a build its source), then
  `flynn-host run --hostnet` of image `stack` (the node and npm the slugbuilder's buildpack
  uses) on host1 with the source bound at /app, which runs the buildpack's `npm ci` (its
  environment: NODE_ENV=production, npm's cache in a bound /cache, `--prefer-offline` once the
  cache is there) and then `node server.js` with PORT set, until `http://<host1>:<port>/`
  answers 200 with the page. Cold: an empty npm cache directory; warm: the changed source,
  pushed again and archived into a new directory, with the cache the cold run left. npm goes
  through the cluster's own registry proxy (`BUILD_HTTPS_PROXY`, the variables
  `flynn_gitreceive.receiver.proxy_env` puts in every build) and trusts the machine's own CAs
  (`BUILD_CA_CERTS`, here as NODE_EXTRA_CA_CERTS), as the cluster's builds do: from the
  machine npm would reach the registry directly, which is several times faster than through
  the proxy and would make the comparison unfair. Reference time = bare push + archive +
  `flynn-host run` → first 200.
* **ratios**: platform push → 200 / reference, cold and warm.
* **idle memory**: after the boot, the CLI's set-up and `--idle` seconds (30) with no user
  app, per host: every process in the host's job cgroups (cgroup v1
  `/sys/fs/cgroup/memory/flynn/<host id>/**/cgroup.procs`, named by the job's
  `flynn-controller.app_name`), the host's `flynn-host daemon`, its job shims and pre-started
  shims, and anything else in its network namespace. RSS and PSS (RSS counts a shared page
  once per process, PSS splits it) from `/proc/<pid>/smaps_rollup`. The development
  cluster's registry proxy (root namespace, not the product) is shown but not counted.

Each of `--rounds` rounds uses new apps, repositories and cache directories; odd rounds start
with the reference, even ones with the platform. Before the rounds, one untimed
`flynn-host run stack true` per host (`prime`) takes the first use of the stack layer, which
both sides share, out of whichever side would come first. Printed per cluster size: medians,
then the table and the memory table; `--json` prints the numbers (and each round's) as JSON.

    FLYNN_IMAGES=/var/lib/flynn/images python bench/deploy.py [--hosts 1,3] [--rounds 2]

It needs root, the images `make dev` builds and the npm registry; ~9 minutes for the
defaults (`--hosts 1,3 --rounds 2`) on 2 CPUs. From a git worktree, run it with a virtualenv
of that worktree (bench/README.md, `build.py`, says why). It prints and asserts nothing; a
failed bootstrap is removed and tried once more, and a cluster size that still fails is
printed as failed (exit 1) after the others. Everything it makes is removed at the end, also
on an error, Ctrl-C or SIGTERM: the `flynn-host run` jobs (stopped after each answer), the
clusters (`booted_cluster` checks nothing of them is left), the scratch directory
(`/tmp/bench-deploy-XXXX`: CLI home, work trees, bare repositories, source and cache
directories).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from build import ANSI, EXAMPLE, NEW, OLD, PAGE, Poller, Push, cli_env, load, pushes, say  # noqa: E402
from flynn_gitreceive.receiver import proxy_env  # noqa: E402

from flynn_host.dev import registry_proxy  # noqa: E402
from flynn_host.dev.cluster import Cluster, ClusterError, local_ca_certs  # noqa: E402
from flynn_host.dev.cluster_hosts import DevClusterHost, netns_pids, pid_alive  # noqa: E402
from flynn_host.types import ENDED_STATES  # noqa: E402
from tests.dev.test_cluster import booted_cluster  # noqa: E402
from tests.test_gitpush_cluster import Env  # noqa: E402

# the targets, printed beside the figures (not checked)
TARGETS = {"cold": 90.0, "warm": 30.0, "memory_mib": 1024.0}
# `flynn-host run --hostnet` listens on host1's own address: a port nothing of the platform uses
PORT_BASE = 47000
RUN_TIMEOUT = 600.0
BOOT_ATTEMPTS = 2
# the buildpack's npm environment (buildpacks/nodejs/bin/compile), npm's cache in the bound /cache
NPM_ENV = {
    "NODE_ENV": "production",
    "NPM_CONFIG_LOGLEVEL": "error",
    "NPM_CONFIG_PRODUCTION": "true",
    "NPM_CONFIG_CACHE": "/cache/npm",
    "NPM_CONFIG_UPDATE_NOTIFIER": "false",
    "NPM_CONFIG_FUND": "false",
    "NPM_CONFIG_AUDIT": "false",
}
STARTED, INSTALLED = "bench: container started", "bench: npm ci done"
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")


# --- the reference: git push to a bare repository, then flynn-host run -------------------


class DirectHTTP:
    """GET / on an address and port, with `Env.http`'s answer shape, for build.py's Poller."""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port

    def http(self, _app: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.ip, self.port, timeout=5)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()


@dataclass
class Run:
    """One `flynn-host run` of the app: its output lines and marks, in seconds from launch."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "\n".join(text for _, text in self.lines)


class Reference:
    """The app without the platform, on one of the cluster's hosts."""

    def __init__(self, c: Cluster, env: Env, scratch: Path) -> None:
        self.c, self.env, self.scratch = c, env, scratch
        self.host: DevClusterHost = c.host(1)
        self.proxy = f"http://{c.gateway}:{registry_proxy.PORT}"
        self.ca_dir = scratch / "ca"
        self.ca_dir.mkdir(exist_ok=True)
        (self.ca_dir / "ca.pem").write_text(local_ca_certs() + "\n")
        self.ports = iter(range(PORT_BASE, PORT_BASE + 1000))

    def git(self, *args: str, cwd: Path) -> None:
        out = self.env.run("git", *args, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed:\n{out.stdout}{out.stderr}")

    def both(self, name: str) -> dict[str, Any]:
        """Cold, then warm: push, archive and run, each timed."""
        work, bare = self.scratch / name, self.scratch / f"{name}.git"
        shutil.copytree(EXAMPLE, work)
        for args in (("init", "-q", "-b", "master"), ("config", "user.email", "t@example.test"),
                     ("config", "user.name", "t")):  # fmt: skip
            self.git(*args, cwd=work)
        self.env.commit(work, "first")
        self.git("init", "-q", "--bare", "-b", "master", str(bare), cwd=self.scratch)
        cache = self.scratch / f"{name}-cache"
        cache.mkdir()
        out: dict[str, Any] = {}
        for kind in ("cold", "warm"):
            if kind == "warm":
                server = work / "server.js"
                server.write_text(server.read_text().replace(OLD, NEW))
                self.env.commit(work, "a one-line change")
            say(f"  {name}: {kind} git push to a bare repository, flynn-host run")
            started = time.monotonic()
            self.git("push", "-q", f"file://{bare}", "master", cwd=work)
            pushed = time.monotonic() - started
            src = self.scratch / f"{name}-src-{kind}"
            src.mkdir()
            started = time.monotonic()
            tar = self.scratch / f"{name}-{kind}.tar"
            self.git("--git-dir", str(bare), "archive", "--format=tar", "-o", str(tar), "master",
                     cwd=self.scratch)  # fmt: skip
            subprocess.run(["tar", "-xf", str(tar), "-C", str(src)], check=True)
            archived = time.monotonic() - started
            run = self.run_app(src, cache, PAGE if kind == "cold" else NEW)
            out[kind] = {"push": pushed, "archive": archived, "run": run}
        return out

    def run_app(self, src: Path, cache: Path, text: str) -> Run:
        """`flynn-host run` of the app in `src` on host1 until it answers 200 with `text`;
        its job is stopped before this returns, whatever happened."""
        port = next(self.ports)
        token = uuid.uuid4().hex
        warm = (cache / "npm" / "_cacache").is_dir()
        script = (f"echo '{STARTED}' && npm ci{' --prefer-offline' if warm else ''} 2>&1 && "
                  f"echo '{INSTALLED}' && exec node server.js")  # fmt: skip
        variables = {
            "BENCH_RUN": token,  # finds the job again, to stop it
            "PORT": str(port),
            **NPM_ENV,
            **proxy_env({"BUILD_HTTPS_PROXY": self.proxy}),
            "NODE_EXTRA_CA_CERTS": "/bench-ca/ca.pem",
        }
        h = self.host
        argv = ["nsenter", f"--net={h.netns_path}", "--", "flynn-host", "run", "--hostnet",
                "--bind", f"{src}:/app:rw,{cache}:/cache:rw,{self.ca_dir}:/bench-ca",
                "--workdir", "/app", "stack",
                "env", *(f"{k}={v}" for k, v in variables.items()), "sh", "-c", script]  # fmt: skip
        run = Run()
        started = time.monotonic()
        # build.py's poller, with the app's own address in place of the router
        poller = Poller(DirectHTTP(h.ip, port), "", text, started)  # type: ignore[arg-type]
        poller.start()
        proc = subprocess.Popen(argv, env=self.c.host_env(h), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        reader = threading.Thread(target=read_lines, args=(proc, run, started), daemon=True)
        reader.start()
        try:
            deadline = started + RUN_TIMEOUT
            while poller.at is None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            poller.join(1)
            if poller.at is None:
                reader.join(2)
                raise RuntimeError(f"flynn-host run did not answer 200 (exit {proc.poll()}):\n"
                                   f"{run.output}")  # fmt: skip
            run.marks["first_200"] = poller.at
        finally:
            poller.stop.set()
            self.stop(token, proc)
            reader.join(5)
        for at, line in run.lines:
            for key, mark in (("started", STARTED), ("installed", INSTALLED),
                              ("listening", "listening on")):  # fmt: skip
                if line.startswith(mark):
                    run.marks.setdefault(key, at)
        return run

    def stop(self, token: str, proc: subprocess.Popen[bytes]) -> None:
        """Stop the job whose command has `token`, then the `flynn-host run` attached to it."""
        client = self.c.client(1)
        for jid, j in client.list_jobs(active=True).items():
            if f"BENCH_RUN={token}" in (j["job"].get("config") or {}).get("args", []):
                client.stop_job(jid)
                deadline = time.monotonic() + 40
                while (time.monotonic() < deadline
                       and client.get_job(jid)["status"] not in ENDED_STATES):  # fmt: skip
                    time.sleep(0.1)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def read_lines(proc: subprocess.Popen[bytes], run: Run, started: float) -> None:
    """A process's output as lines, each with the time its end arrived."""
    assert proc.stdout is not None
    partial = b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        now = time.monotonic() - started
        *done, partial = re.split(rb"[\r\n]", partial + chunk)
        run.lines += [(now, ANSI.sub("", x.decode(errors="replace"))) for x in done if x]


# --- idle memory -------------------------------------------------------------------------


def rss_pss(pid: int) -> tuple[int, int] | None:
    """A process's RSS and PSS in kB, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
    return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def host_processes(c: Cluster, h: DevClusterHost) -> dict[int, str]:
    """Every process of host `h`, named: the app of the job whose cgroup it is in, the daemon,
    a shim (a job's, or a pre-started one), or what else runs in the host's namespace."""
    apps: dict[str, str] = {}
    for jid, j in c.client(h.index).list_jobs().items():
        meta = j["job"].get("metadata") or {}
        apps[jid] = meta.get("flynn-controller.app_name") or f"job {jid} (no app)"
    owner: dict[int, str] = {}
    base = MEMORY_CGROUP / "flynn" / h.id
    for procs in sorted(base.rglob("cgroup.procs")):
        parts = procs.parent.relative_to(base).parts  # (partition, job id, ...)
        name = apps.get(parts[1], f"job {parts[1]}") if len(parts) > 1 else "/".join(parts)
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            owner.setdefault(pid, name)
    run_dir = str(h.run_dir) + "/"
    # a pre-started shim keeps its `--idle` argv once it owns a job; it then writes shim.pid
    job_shims = set()
    for f in h.run_dir.glob("*/jobs/*/shim.pid"):
        try:
            job_shims.add(int(f.read_text()))
        except (OSError, ValueError):
            continue
    candidates = set(netns_pids(h.netns))
    # shims whose namespace `ip netns pids` missed: they name the host's run directory
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and any(a.startswith(run_dir) for a in cmdline(int(d.name))):
            candidates.add(int(d.name))
    for pid in sorted(candidates - owner.keys()):
        argv = cmdline(pid)
        if pid == h.pid:
            owner[pid] = "flynn-host daemon"
        elif pid in job_shims:
            owner[pid] = "shims of the jobs (one a job)"
        elif "flynn_host.runtime.shim" in argv or argv[1:2] == ["shim"]:
            owner[pid] = "shims started ahead, idle (ShimPool)"
        elif argv and argv[0]:
            owner[pid] = f"other: {Path(argv[0]).name}"
    return owner


def platform_memory(c: Cluster) -> dict[str, Any]:
    """RSS and PSS (MiB) of every process of the platform, by name, per host and in total."""
    by_name: dict[str, dict[str, Any]] = {}
    everything = {"procs": 0, "rss_kb": 0, "pss_kb": 0}
    hosts = []
    for h in c.hosts:
        total = {"procs": 0, "rss_kb": 0, "pss_kb": 0}
        for pid, name in host_processes(c, h).items():
            m = rss_pss(pid)
            if m is None:
                continue
            row = by_name.setdefault(name, {"procs": 0, "rss_kb": 0, "pss_kb": 0, "hosts": set()})
            for r in (row, total, everything):
                r["procs"] += 1
                r["rss_kb"] += m[0]
                r["pss_kb"] += m[1]
            row["hosts"].add(h.index)
        # the kernel's count for the job cgroups alone (no daemon, no shims; page cache in)
        try:
            usage = int((MEMORY_CGROUP / "flynn" / h.id / "memory.usage_in_bytes").read_text())
        except (OSError, ValueError):
            usage = 0
        hosts.append({"host": h.id, **mib(total), "cgroup_usage_mib": round(usage / 2**20, 1)})
    rows = {name: {**mib(r), "hosts": sorted(r["hosts"])} for name, r in by_name.items()}
    proxy = {}
    try:
        pid = int(c.registry_proxy_pid_file.read_text())
        if pid_alive(pid) and (m := rss_pss(pid)):
            proxy = {"rss_mib": round(m[0] / 1024, 1), "pss_mib": round(m[1] / 1024, 1)}
    except (OSError, ValueError):
        pass
    return {"by_name": rows, "hosts": hosts, "total": mib(everything), "registry_proxy": proxy}


def mib(r: dict[str, Any]) -> dict[str, Any]:
    return {"procs": r["procs"], "rss_mib": round(r["rss_kb"] / 1024, 1),
            "pss_mib": round(r["pss_kb"] / 1024, 1)}  # fmt: skip


# --- the run ----------------------------------------------------------------------------


def platform_row(p: Push) -> dict[str, Any]:
    phases = {k: None if v is None else round(v, 2) for k, v in p.phases().items()}
    return {"push_s": round(p.marks["returned"], 2), "to_200_s": round(p.marks["first_200"], 2),
            "phases_s": phases}  # fmt: skip


def reference_row(r: dict[str, Any]) -> dict[str, Any]:
    run: Run = r["run"]
    marks = {k: round(v, 2) for k, v in run.marks.items()}
    total = r["push"] + r["archive"] + run.marks["first_200"]
    return {"push_s": round(r["push"], 3), "archive_s": round(r["archive"], 3),
            "run_to_200_s": marks["first_200"], "run_marks_s": marks,
            "to_200_s": round(total, 2), "run_output": run.output.splitlines()}  # fmt: skip


def measure(n: int, rounds: int, idle: float, scratch: Path) -> dict[str, Any]:
    """Boot an n-host cluster, measure its idle memory, then the rounds; take it down."""
    result: dict[str, Any] = {"hosts": n, "rounds": [], "boot_failures": []}
    with contextlib.ExitStack() as stack:
        c = boot(stack, n, result)
        home = scratch / "home"
        home.mkdir()
        env = cli_env(c, home)
        say(f"  booted in {result['boot_s']:.0f}s; idle for {idle:.0f}s, then memory")
        time.sleep(idle)
        result["memory"] = platform_memory(c)
        say(f"  idle memory: RSS {result['memory']['total']['rss_mib']:.0f} MiB, "
            f"PSS {result['memory']['total']['pss_mib']:.0f} MiB")  # fmt: skip
        ref = Reference(c, env, scratch)
        result["prime_s"] = prime(c)
        for r in range(1, rounds + 1):
            say(f"round {r}/{rounds} on {n} host(s) (load {load():.2f})")
            row: dict[str, Any] = {"load": [round(load(), 2)]}
            if r % 2:
                reference = ref.both(f"ref{r}")
                platform = pushes(env, f"bench{r}")
            else:
                platform = pushes(env, f"bench{r}")
                reference = ref.both(f"ref{r}")
            row["load"].append(round(load(), 2))
            for kind in ("cold", "warm"):
                row[kind] = {"platform": platform_row(platform[kind]),
                             "reference": reference_row(reference[kind])}  # fmt: skip
                p, q = row[kind]["platform"]["to_200_s"], row[kind]["reference"]["to_200_s"]
                row[kind]["ratio"] = round(p / q, 2)
                say(f"  {kind}: platform {p:.2f}s, reference {q:.2f}s ({p / q:.2f}×)")
            result["rounds"].append(row)
        say(f"taking the {n}-host cluster down")
    result["median"] = medians(result["rounds"])
    return result


def boot(stack: contextlib.ExitStack, n: int, result: dict[str, Any]) -> Cluster:
    """An n-host cluster, taken down when `stack` closes. A failed bootstrap is removed
    (`booted_cluster`), recorded, and tried once more: the numbers are what the run is for,
    and the failure is printed with them."""
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        say(f"booting a {n}-host cluster (load {load():.2f})")
        started = time.monotonic()
        try:
            c = stack.enter_context(booted_cluster(n))
        except ClusterError as exc:
            # bootstrap's own output, with the failed step, went to stderr above
            result["boot_failures"].append(str(exc))
            say(f"  boot failed: {exc}")
            if attempt == BOOT_ATTEMPTS:
                raise
            continue
        result["boot_s"] = round(time.monotonic() - started, 1)
        return c
    raise AssertionError("unreachable")


def prime(c: Cluster) -> list[float]:
    """`flynn-host run stack true` once on each host, untimed in the rounds: a daemon hashes a
    cached layer again at its first use (`runtime/layers.py`), ~2.5 s for the stack layer
    that slugbuilder, slugrunner and `stack` share; whichever side came first would pay it."""
    times = []
    for h in c.hosts:
        started = time.monotonic()
        out = c.exec(h.index, ["flynn-host", "run", "stack", "true"], capture_output=True,
                     text=True, stdin=subprocess.DEVNULL)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"flynn-host run stack true on {h.id}: {out.stdout}{out.stderr}")
        times.append(round(time.monotonic() - started, 2))
    say(f"  first use of the stack image on each host (untimed in the rounds): {times} s")
    return times


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(kind: str, side: str, key: str) -> float:
        return round(statistics.median(r[kind][side][key] for r in rounds), 3)

    out: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        out[kind] = {
            "platform": {k: med(kind, "platform", k) for k in ("push_s", "to_200_s")},
            "reference": {k: med(kind, "reference", k)
                          for k in ("push_s", "archive_s", "run_to_200_s", "to_200_s")},
        }  # fmt: skip
        for mark in ("started", "installed", "listening"):
            values = [r[kind]["reference"]["run_marks_s"].get(mark) for r in rounds]
            known = [v for v in values if v is not None]
            out[kind]["reference"][f"run_{mark}_s"] = statistics.median(known) if known else None
        out[kind]["ratio"] = round(
            out[kind]["platform"]["to_200_s"] / out[kind]["reference"]["to_200_s"], 2
        )
    return out


def run(sizes: list[int], rounds: int, idle: float) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    out: dict[str, Any] = {"example": "nodejs", "load_before": round(load(), 2), "sizes": []}
    try:
        for n in sizes:
            where = scratch / f"hosts{n}"
            where.mkdir()
            try:
                out["sizes"].append(measure(n, rounds, idle, where))
            except Exception as exc:  # the other sizes are still measured and printed
                say(f"{n} host(s) failed: {exc!r}")
                out["sizes"].append({"hosts": n, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out["load_after"] = round(load(), 2)
    return out


# --- output -----------------------------------------------------------------------------


def s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def print_size(r: dict[str, Any]) -> None:
    n, m = r["hosts"], r["median"]
    loads = [x for row in r["rounds"] for x in row["load"]]
    print(f"\n## {n} host{'s' if n > 1 else ''}: median of {len(r['rounds'])} round(s), "
          f"load {min(loads):.2f}–{max(loads):.2f}, boot {r['boot_s']:.0f} s, first use of "
          f"the stack image {', '.join(f'{x:.1f}' for x in r['prime_s'])} s")  # fmt: skip
    for failure in r["boot_failures"]:
        print(f"(a boot before this one failed: {failure}; retried)")
    print()
    print("| | platform | reference | ratio | target |")
    print("|---|---|---|---|---|")
    for kind in ("cold", "warm"):
        p, q = m[kind]["platform"], m[kind]["reference"]
        # the platform's push includes the build and deploy: no ratio on its own
        print(f"| {kind}: git push | {s(p['push_s'])} | {s(q['push_s'])} (bare repository) | | |")
        print(f"| {kind}: push → first 200 | {s(p['to_200_s'])} | {s(q['to_200_s'])} "
              f"(push + archive + run) | {m[kind]['ratio']:.2f}× | ≤ {TARGETS[kind]:.0f} s "
              f"({p['to_200_s'] / TARGETS[kind]:.2f}× of it) |")  # fmt: skip
    print()
    for kind in ("cold", "warm"):
        q = m[kind]["reference"]
        print(f"reference, {kind}: archive {s(q['archive_s'])}; flynn-host run → container "
              f"started {s(q['run_started_s'])} → npm ci done {s(q['run_installed_s'])} → "
              f"listening {s(q['run_listening_s'])} → 200 {s(q['run_to_200_s'])}")  # fmt: skip
    for i, row in enumerate(r["rounds"], 1):
        cells = [f"{kind} {row[kind]['platform']['to_200_s']:.2f} / "
                 f"{row[kind]['reference']['to_200_s']:.2f} s = {row[kind]['ratio']:.2f}×"
                 for kind in ("cold", "warm")]  # fmt: skip
        print(f"round {i} (load {row['load'][0]:.2f} → {row['load'][1]:.2f}): {'; '.join(cells)}")
    print_memory(r)


def print_memory(r: dict[str, Any]) -> None:
    mem = r["memory"]
    n = r["hosts"]
    print(f"\nidle memory of the platform on {n} host{'s' if n > 1 else ''} (MiB):\n")
    print("| | hosts | processes | RSS | PSS |")
    print("|---|---|---|---|---|")
    for name, row in sorted(mem["by_name"].items(), key=lambda kv: -kv[1]["pss_mib"]):
        on = ",".join(str(i) for i in row["hosts"])
        print(f"| {name} | {on} | {row['procs']} | {row['rss_mib']:.1f} | {row['pss_mib']:.1f} |")
    t = mem["total"]
    print(f"| **total** | | {t['procs']} | **{t['rss_mib']:.1f}** | **{t['pss_mib']:.1f}** |")
    target = TARGETS["memory_mib"]
    print(f"| target, 1 host: 1 GB | | | {target:.0f} ({t['rss_mib'] / target:.2f}× of it) | "
          f"{target:.0f} ({t['pss_mib'] / target:.2f}× of it) |")  # fmt: skip
    for h in mem["hosts"]:
        print(f"  {h['host']}: {h['procs']} processes, RSS {h['rss_mib']:.1f}, PSS "
              f"{h['pss_mib']:.1f}; its job cgroups' memory.usage_in_bytes (with page cache) "
              f"{h['cgroup_usage_mib']:.1f}")  # fmt: skip
    if mem["registry_proxy"]:
        p = mem["registry_proxy"]
        print(f"  not counted: the development registry proxy, RSS {p['rss_mib']:.1f}, "
              f"PSS {p['pss_mib']:.1f}")  # fmt: skip


def print_result(result: dict[str, Any]) -> None:
    print(f"Node.js example: git push → first 200 through the router, next to git push to a "
          f"bare repository + flynn-host run of the app; load {result['load_before']:.2f} "
          f"before, {result['load_after']:.2f} after")  # fmt: skip
    for r in result["sizes"]:
        if "error" in r:
            print(f"\n## {r['hosts']} host(s): failed, {r['error']}")
        else:
            print_size(r)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", default="1,3", help="cluster sizes, comma-separated [1,3]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--idle", type=float, default=30.0, help="seconds idle before memory [30]")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/deploy.py needs root (namespaces, mounts)")
    try:
        sizes = [int(x) for x in args.hosts.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--hosts {args.hosts!r}: expected numbers, e.g. 1,3") from None
    if not sizes or min(sizes) < 1 or args.rounds < 1:
        raise SystemExit("--hosts and --rounds must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so the clusters are taken down
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(sizes, args.rounds, args.idle)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result)
    return 1 if any("error" in r for r in result["sizes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
