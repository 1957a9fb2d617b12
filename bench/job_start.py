"""Job start latency: flynn-host (API call → `running`) next to bare `runc run` of the same rootfs.

Starts a real `flynn-host daemon` with every path under a short temp dir, then times N busybox
jobs one at a time: from just before `PUT /host/jobs/<id>` until the job's `start` event arrives
on the `GET /host/jobs` event stream. Each job is stopped and its `cleanup` event awaited before
the next, so every start is measured alone. In the same run, in alternating blocks of five so
machine-load drift hits both alike, it times bare `runc run --detach` of the same squashfs layer
under a fresh overlay with the same OCI config (`flynn_host.runtime.bundle.oci_spec`); the
overlay mount and the container's removal are outside that timed region. It prints median, p95,
min and max of both, their ratio against the goal (within 3× of bare runc), and where
flynn-host's time went, read from the mtimes of the files each start step writes.

`--seccomp` compares flynn-host with itself instead: jobs under the default seccomp profile
(`flynn_host.runtime.seccomp`) next to system-partition jobs with `seccomp: unconfined`,
alternating in blocks of five the same way, against the goal that the filter costs at most 10%
of a start.

By default one long-running job keeps the image's layer mounted, as on a host already running
that image; `--cold-layer` leaves it out so every job also mounts and unmounts the squashfs.

    python bench/job_start.py [--images DIR] [--jobs 50] [--cold-layer] [--seccomp] [--json]

Needs root (mounts, loop devices, runc). Everything it makes is removed at the end, also on
Ctrl-C or an error: daemon, shims, containers, mounts, loop devices, cgroups and the temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stats import summary  # noqa: E402

from flynn_host.dev import host as devhost  # noqa: E402
from flynn_host.dev.busybox import build_busybox_image  # noqa: E402
from flynn_host.runtime import bundle, images  # noqa: E402
from flynn_host.runtime.runc import find_init  # noqa: E402
from flynn_host.types import Job, job_key  # noqa: E402

GOAL_RATIO = 3.0
SECCOMP_GOAL_RATIO = 1.10  # the default profile may make a start at most 10% slower
# what turns the filter off: only a system-partition job may ask
UNCONFINED = {"partition": "system", "config": {"seccomp": "unconfined"}}
WARMUP = 3
BLOCK = 5  # measurements per turn when alternating flynn-host and bare runc
JOB_ARGS = ["sleep", "30"]  # stays running until stopped; tini passes on the SIGTERM
EVENT_TIMEOUT = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
PR_SET_CHILD_SUBREAPER = 36

# Where flynn-host's start goes, from the files each step leaves (see `FlynnHost.phases`).
PHASES = [
    ("api", "API reply (PUT → 200)"),
    ("prepare", "daemon: layer, mkfs.ext2, loop + overlay mounts, config (→ config.json)"),
    ("shim", "shim: Python start-up and imports (config.json → shim.pid)"),
    ("runc", "runc run --detach (shim.pid → container.pid)"),
    ("report", "shim reply, daemon, SSE event (container.pid → start event)"),
]


# --- helpers ----------------------------------------------------------------------------------


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def loops_under(base: Path) -> list[str]:
    out = run("losetup", "-a", check=False).stdout
    return [line for line in out.splitlines() if f"{base}/" in line]


def become_subreaper() -> None:
    """Bare runc's containers outlive `runc run`: as their reaper we can wait for them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(pid: int, timeout: float = 10.0) -> None:
    try:
        os.waitpid(pid, 0)
        return
    except ChildProcessError:  # not ours after all: wait until it is gone
        pass
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)


# --- flynn-host -------------------------------------------------------------------------------


class EventStream:
    """`GET /host/jobs` as server-sent events, read in a thread; each event is queued with the
    `perf_counter` time it arrived."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=None)
        self.conn.request("GET", "/host/jobs", headers={"Accept": "text/event-stream", **headers})
        self.resp = self.conn.getresponse()  # headers sent: the daemon has subscribed us
        if self.resp.status != 200:
            raise RuntimeError(f"GET /host/jobs (event stream): HTTP {self.resp.status}")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        # any error ends the stream (also the one `close` causes): waiters then time out
        with contextlib.suppress(Exception):
            while line := self.resp.readline():
                if line.startswith(b"data: "):
                    self.events.put((time.perf_counter(), json.loads(line[6:])))

    def wait(self, job_id: str, names: set[str]) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"job {job_id}: no {'/'.join(sorted(names))} event")
            try:
                at, event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event.get("job_id") == job_id and event.get("event") in names:
                return at, event

    def close(self) -> None:
        # shut the socket down and let the reader finish before closing what it reads from
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        self.reader.join(timeout=5)
        self.conn.close()


class FlynnHost:
    """A `flynn-host daemon` (a `devhost.Daemon`: every path under `base`, removed completely
    at the end), and jobs started through its API."""

    def __init__(self, daemon: devhost.Daemon, job_template: dict[str, Any]) -> None:
        self.daemon = daemon
        self.base = daemon.base
        self.host_id = daemon.host_id
        self.port = daemon.port
        self.job_template = job_template
        self.api: http.client.HTTPConnection | None = None
        self.stream: EventStream | None = None

    def start(self) -> None:
        self.daemon.start()
        self.stream = EventStream(self.port, self.daemon.auth_headers)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on a kept-alive connection (reopened if the daemon closed it)."""
        for attempt in (1, 2):
            if self.api is None:
                self.api = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                headers = dict(self.daemon.auth_headers)
                if body is not None:
                    headers["Content-Type"] = "application/json"
                self.api.request(method, path, body=body, headers=headers)
                resp = self.api.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                self.api.close()
                self.api = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def job(self, job_id: str, args: list[str], extra: dict[str, Any] | None = None) -> bytes:
        """The job's JSON: the template, `args`, and `extra`'s top-level and config fields."""
        raw = json.loads(json.dumps(self.job_template))
        raw["id"] = job_id
        raw["config"]["args"] = args
        extra = extra or {}
        raw.update({k: v for k, v in extra.items() if k != "config"})
        raw["config"].update(extra.get("config") or {})
        return json.dumps(raw).encode()

    def start_job(
        self, job_id: str, args: list[str] = JOB_ARGS, extra: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Start a job; return its start latency and phases in seconds."""
        assert self.stream is not None
        body = self.job(job_id, args, extra)
        t0_wall, t0 = time.time_ns(), time.perf_counter()
        status, reply = self.request("PUT", f"/host/jobs/{job_id}", body)
        t_api = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"PUT /host/jobs/{job_id}: HTTP {status}: {reply.decode()}")
        t1, event = self.stream.wait(job_id, {"start", "error"})
        if event["event"] == "error":
            raise RuntimeError(f"job {job_id} failed: {event['job'].get('error')}")
        return {"total": t1 - t0, **self.phases(job_id, t0_wall, t_api - t0, t1 - t0)}

    def phases(self, job_id: str, t0_wall: int, api: float, total: float) -> dict[str, float]:
        """Split a start by the mtimes of the files it wrote (the kernel's file clock may lag a
        tick behind; the files are gone once the job is cleaned up, so read them now)."""
        key = job_key(job_id)
        files = {
            "config": self.base / "work" / "jobs" / key / "bundle" / "config.json",
            "shim": self.base / "run" / self.host_id / "jobs" / key / "shim.pid",
            "container": self.base / "run" / self.host_id / "jobs" / key / "container.pid",
        }
        try:
            at = {k: (p.stat().st_mtime_ns - t0_wall) / 1e9 for k, p in files.items()}
        except OSError:
            return {}
        return {
            "api": api,
            "prepare": at["config"],
            "shim": at["shim"] - at["config"],
            "runc": at["container"] - at["shim"],
            "report": total - at["container"],
        }

    def stop_job(self, job_id: str) -> None:
        assert self.stream is not None
        status, reply = self.request("DELETE", f"/host/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"DELETE /host/jobs/{job_id}: HTTP {status}: {reply.decode()}")
        self.stream.wait(job_id, {"cleanup"})

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.api is not None:
            self.api.close()
        self.daemon.cleanup()


# --- bare runc --------------------------------------------------------------------------------


class BareRunc:
    """`runc run --detach` of the same squashfs layer under a fresh overlay, with the config
    flynn-host would write for the same job (its cgroup under this host's, so cleaned alike)."""

    def __init__(self, base: Path, host_id: str, job_template: dict[str, Any], layer: Path):
        self.dir = base / "bare"
        self.host_id = host_id
        self.job_template = job_template
        self.runc = shutil.which("runc") or "/usr/sbin/runc"
        self.root = self.dir / "runc"
        self.layer_file = self.dir / "layer.squashfs"
        self.lower = self.dir / "lower"
        self.settings = bundle.HostSettings(
            host_id=host_id, cgroup_parent=f"flynn/{host_id}", init_path=find_init(),
            listen_ip="127.0.0.1",
        )  # fmt: skip
        self.dir.mkdir()
        # a private copy, so its loop device points under the temp dir like the daemon's do
        shutil.copyfile(layer, self.layer_file)
        self.lower.mkdir()
        run("mount", "-t", "squashfs", "-o", "loop,ro", str(self.layer_file), str(self.lower))

    def run_once(self, n: int) -> float:
        """One timed `runc run --detach`; set-up and removal are outside the timed region."""
        cid = f"{self.host_id}-bare{n}"
        b = self.dir / f"b{n}"
        for name in ("upper", "work", "rootfs"):
            (b / name).mkdir(parents=True)
        opts = f"lowerdir={self.lower},upperdir={b / 'upper'},workdir={b / 'work'}"
        run("mount", "-t", "overlay", "overlay", "-o", opts, str(b / "rootfs"))
        try:
            job = Job.from_json({**self.job_template, "id": cid}, cid)
            spec = bundle.oci_spec(job, self.settings, str(b / "rootfs"), {})
            (b / "config.json").write_text(json.dumps(spec))
            args = [self.runc, "--root", str(self.root), "--log", str(b / "runc.log")]
            args += ["--log-format", "json", "run", "--detach"]
            args += ["--pid-file", str(b / "container.pid"), "--bundle", str(b), cid]
            # the container inherits runc's stdio: /dev/null, never this terminal or a pipe
            # that would keep subprocess.run waiting
            t0 = time.perf_counter()
            rc = subprocess.run(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ).returncode  # fmt: skip
            elapsed = time.perf_counter() - t0
            if rc != 0:
                log = (b / "runc.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"bare runc run failed ({rc}): {log[-1] if log else ''}")
            pid = int((b / "container.pid").read_text())
            run(self.runc, "--root", str(self.root), "kill", cid, "KILL", check=False)
            reap(pid)
            run(self.runc, "--root", str(self.root), "delete", "--force", cid, check=False)
        finally:
            run("umount", str(b / "rootfs"), check=False)
        shutil.rmtree(b)
        return elapsed


# --- the benchmark ----------------------------------------------------------------------------


def measure(host: FlynnHost, bare: BareRunc, jobs: int, progress: bool) -> dict[str, Any]:
    def flynn_one(tag: str) -> dict[str, float]:
        job_id = f"{host.host_id}-{tag}{uuid.uuid4().hex[:12]}"
        sample = host.start_job(job_id)
        host.stop_job(job_id)
        return sample

    for i in range(WARMUP):
        flynn_one("warm")
        bare.run_once(-1 - i)
    flynn: list[dict[str, float]] = []
    runc: list[float] = []
    while len(flynn) < jobs or len(runc) < jobs:
        for _ in range(min(BLOCK, jobs - len(flynn))):
            flynn.append(flynn_one("job"))
        for _ in range(min(BLOCK, jobs - len(runc))):
            runc.append(bare.run_once(len(runc)))
        if progress:
            print(f"\r  {len(flynn)}/{jobs} flynn-host, {len(runc)}/{jobs} runc", end="",
                  file=sys.stderr, flush=True)  # fmt: skip
    if progress:
        print(file=sys.stderr)

    f = summary([s["total"] for s in flynn])
    r = summary(runc)
    with_phases = [s for s in flynn if "prepare" in s]  # every one, unless a file was missing
    breakdown = {}
    if with_phases:
        for key, _ in PHASES:
            breakdown[key] = round(statistics.median(s[key] for s in with_phases) * 1000, 2)
    ratio = {"median": round(f["median"] / r["median"], 3), "p95": round(f["p95"] / r["p95"], 3)}
    return {
        "jobs": jobs,
        "flynn_host_ms": f,
        "bare_runc_ms": r,
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": {k: v <= GOAL_RATIO for k, v in ratio.items()},
        "flynn_host_phases_median_ms": breakdown,
        "samples_ms": {
            "flynn_host": [round(s["total"] * 1000, 2) for s in flynn],
            "bare_runc": [round(x * 1000, 2) for x in runc],
        },
    }


def measure_seccomp(host: FlynnHost, jobs: int, progress: bool) -> dict[str, Any]:
    """flynn-host starts under the default seccomp profile and unconfined, alternating."""

    def one(tag: str, extra: dict[str, Any] | None) -> float:
        job_id = f"{host.host_id}-{tag}{uuid.uuid4().hex[:12]}"
        sample = host.start_job(job_id, extra=extra)
        host.stop_job(job_id)
        return sample["total"]

    for _ in range(WARMUP):
        one("warm", None)
        one("warm", UNCONFINED)
    confined: list[float] = []
    unconfined: list[float] = []
    while len(confined) < jobs or len(unconfined) < jobs:
        for _ in range(min(BLOCK, jobs - len(confined))):
            confined.append(one("sc", None))
        for _ in range(min(BLOCK, jobs - len(unconfined))):
            unconfined.append(one("unc", UNCONFINED))
        if progress:
            print(f"\r  {len(confined)}/{jobs} default profile, {len(unconfined)}/{jobs} "
                  "unconfined", end="", file=sys.stderr, flush=True)  # fmt: skip
    if progress:
        print(file=sys.stderr)
    c, u = summary(confined), summary(unconfined)
    ratio = {"median": round(c["median"] / u["median"], 3), "p95": round(c["p95"] / u["p95"], 3)}
    return {
        "jobs": jobs,
        "seccomp_default_ms": c,
        "seccomp_unconfined_ms": u,
        "ratio": ratio,
        "goal_ratio": SECCOMP_GOAL_RATIO,
        "goal_met": {k: v <= SECCOMP_GOAL_RATIO for k, v in ratio.items()},
        "samples_ms": {
            "seccomp_default": [round(x * 1000, 2) for x in confined],
            "seccomp_unconfined": [round(x * 1000, 2) for x in unconfined],
        },
    }


def print_seccomp_table(result: dict[str, Any], cold_layer: bool) -> None:
    c, u, ratio = result["seccomp_default_ms"], result["seccomp_unconfined_ms"], result["ratio"]
    layer = "mounted for every job" if cold_layer else "kept mounted by a running job"
    print(f"flynn-host job start (API call → running), {result['jobs']} busybox "
          f"`{' '.join(JOB_ARGS)}` jobs each (image layer {layer})")  # fmt: skip
    print(f"{'':34}{'median':>9}{'p95':>9}{'min':>9}{'max':>9}  ms")
    for label, s in (("default seccomp profile", c), ("unconfined (system partition)", u)):
        print(f"{label:34}" + "".join(f"{s[k]:9.1f}" for k in ("median", "p95", "min", "max")))
    print(f"{'ratio':34}{ratio['median']:8.3f}×{ratio['p95']:8.3f}×")
    verdict = ", ".join(f"{k} {'met' if ok else 'missed'}" for k, ok in result["goal_met"].items())
    goal = round((SECCOMP_GOAL_RATIO - 1) * 100)
    print(f"goal: the profile costs at most {goal}% of a start: {verdict}")


def print_table(result: dict[str, Any], cold_layer: bool) -> None:
    f, r, ratio = result["flynn_host_ms"], result["bare_runc_ms"], result["ratio"]
    layer = "mounted for every job" if cold_layer else "kept mounted by a running job"
    print(f"job start latency, {result['jobs']} busybox `{' '.join(JOB_ARGS)}` jobs each "
          f"(image layer {layer})")  # fmt: skip
    print(f"{'':34}{'median':>9}{'p95':>9}{'min':>9}{'max':>9}  ms")
    for label, s in (("flynn-host (API call → running)", f), ("bare runc run --detach", r)):
        print(f"{label:34}" + "".join(f"{s[k]:9.1f}" for k in ("median", "p95", "min", "max")))
    print(f"{'ratio':34}{ratio['median']:8.2f}×{ratio['p95']:8.2f}×")
    verdict = ", ".join(f"{k} {'met' if ok else 'missed'}" for k, ok in result["goal_met"].items())
    print(f"goal: within {GOAL_RATIO:g}× of bare runc: {verdict}")
    phases = result["flynn_host_phases_median_ms"]
    if phases:
        print("\nwhere flynn-host's start goes (median of each step, ms):")
        for key, label in PHASES:
            print(f"  {phases[key]:7.1f}  {label}")


def cleanup(base: Path, host_id: str, host: FlynnHost | None) -> list[str]:
    """Remove everything the run made; return what could not be removed."""
    runc = shutil.which("runc") or "/usr/sbin/runc"
    bare_root = base / "bare" / "runc"
    if bare_root.exists():  # bare containers first: they are ours to reap
        for cid in run(runc, "--root", str(bare_root), "list", "-q", check=False).stdout.split():
            run(runc, "--root", str(bare_root), "delete", "--force", cid, check=False)
    if host is not None:
        host.stop()  # the daemon, its shims, containers, mounts, cgroups and `base`
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:  # processes adopted as their subreaper
            pass
    for point in sorted(devhost.mounts_under(base), key=len, reverse=True):
        run("umount", "-d", "-l", point, check=False)
    shutil.rmtree(base, ignore_errors=True)
    left = [f"mount {m}" for m in devhost.mounts_under(base)]
    left += [f"loop {x}" for x in loops_under(base)]
    left += [f"dir {base}"] if base.exists() else []
    left += [f"cgroup {h / 'flynn' / host_id}" for h in CGROUP_ROOT.iterdir()
             if (h / "flynn" / host_id).exists()]  # fmt: skip
    return left


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--images",
        type=Path,
        default=images.images_dir(),
        help="images directory (the busybox image is built there if missing)",
    )
    p.add_argument("--jobs", type=int, default=50, help="measured starts of each kind")
    p.add_argument(
        "--cold-layer",
        action="store_true",
        help="no job holds the layer: every flynn-host job mounts it afresh",
    )
    p.add_argument(
        "--seccomp",
        action="store_true",
        help="compare the default seccomp profile with unconfined jobs instead of bare runc",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if os.geteuid() != 0:
        print("error: needs root (mounts, loop devices, runc)", file=sys.stderr)
        return 1

    images_dir = args.images.absolute()
    try:
        manifest_path = build_busybox_image(images_dir)
        manifest, _ = images.load_manifest(str(manifest_path), images_dir)
        specs = images.mountspecs_for(manifest, images.local_layer_template(images_dir))
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as e:
        print(f"error: the busybox image in {images_dir}: {e}", file=sys.stderr)
        return 1
    if len(specs) != 1:
        print("error: expected a one-layer busybox image", file=sys.stderr)
        return 1
    layer = images_dir / "layers" / f"{specs[0]['id']}.squashfs"
    template = {"mountspecs": specs, "config": {"args": JOB_ARGS}, "resources": {}}

    become_subreaper()
    daemon = devhost.make_daemon(
        f"bench{uuid.uuid4().hex[:8]}", start=False,
        extra_args=["--max-job-concurrency", "1", "--stop-timeout", "5"],
    )  # fmt: skip
    base, host_id = daemon.base, daemon.host_id
    host: FlynnHost | None = None
    on_int = signal.getsignal(signal.SIGINT)
    on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        host = FlynnHost(daemon, template)
        host.start()
        if not args.cold_layer:
            host.start_job(f"{host_id}-hold", ["sleep", "3600"])
        if args.seccomp:
            result = measure_seccomp(host, args.jobs, progress=sys.stderr.isatty())
        else:
            bare = BareRunc(base, host_id, template, layer)
            result = measure(host, bare, args.jobs, progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        # an impatient second Ctrl-C must not leave half the clean-up undone
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = cleanup(base, host_id, host)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_term)
        if left:
            print("error: left behind: " + "; ".join(left), file=sys.stderr)
    result["cold_layer"] = args.cold_layer
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.seccomp:
        print_seccomp_table(result, args.cold_layer)
    else:
        print_table(result, args.cold_layer)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
