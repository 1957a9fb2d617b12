"""The scheduler's speed on a 3-host development cluster booted with `flynn-host bootstrap`:
scaling up next to starting the same jobs directly, and how long a lost host's jobs take to
run elsewhere.

* **scale**: `flynn scale web=N` (0 → `--jobs`, default 20) of a busybox httpd app, run in
  host 1's network namespace, until the CLI has seen every `up` event: its own figure ("scale
  completed in", from the formation's PUT to the last `up`) and the command's wall time.
  **Reference**, in the same run: the same N jobs put directly on the hosts
  (`PUT /host/jobs/:id`, all at once, spread 7/7/6 as the scheduler spreads them) with the job
  JSON the scheduler made (a copy of one of its jobs on the same host with a new id and without
  the controller's metadata, so the scheduler leaves them alone), from the first PUT until
  every host's event stream has said `running` for each (a job a busy host refuses with 429,
  "retry shortly", is put again 50 ms later). A warm-up round of each first (the
  image is imported on every host), then `--rounds` alternating rounds; between rounds every
  job is stopped and ended. Ratio = scheduler / direct.
* **host loss**: with N jobs up, a host that holds some of them (not host 1, where the CLI
  runs, nor the PostgreSQL primary's, whose fail-over is another benchmark) is killed whole
  (daemon, jobs and namespace, as a machine that dies). A watcher in host 1's namespace polls
  every 0.2 s: discoverd's `flynn-host` instances (the host's registration expires), the
  scheduler leader's `/debug/state` (the host is given up after 10 failed checks) and the
  controller's job list (the app has N jobs `up` again, none on the lost host). **Detection** =
  kill → given up (with the discoverd part shown), **replacement** = given up → N up again.

    python bench/scale.py [--jobs 20] [--rounds 3] [--json]

It needs root and the images `make dev` builds; about 2 minutes. It prints, and asserts
nothing. The cluster is removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flynn_host.dev.cluster import Cluster, ClusterError  # noqa: E402
from flynn_host.dev.controller import cluster_controller  # noqa: E402
from flynn_host.dev.host import wait_for  # noqa: E402

APP = "bench"
BUSYBOX = "file:///var/lib/flynn/images/busybox/manifest.json"
FLYNN = str(Path(sys.executable).parent / "flynn")
ENDED = ("done", "crashed", "failed")
RETRY_429 = 0.05  # the reference's pause before it puts a job a busy host refused again
RELEASE = {
    "processes": {
        "web": {
            "cmd": [
                "sh",
                "-c",
                "echo $FLYNN_JOB_ID > /tmp/index.html; exec httpd -f -p 8080 -h /tmp",
            ],
            "ports": [
                {"port": 8080, "proto": "tcp", "service": {"name": f"{APP}-web", "create": True}}
            ],
        }
    }
}

GET = """
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""

# Runs in host 1's namespace during the host loss; one JSON line per change it sees.
WATCHER = r"""
import base64, json, sys, time, urllib.request
disc, key, app, lost, n = sys.argv[1:6]
n = int(n)
auth = {"Authorization": "Basic " + base64.b64encode((":" + key).encode()).decode()}
def get(url, headers={}):
    try:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=2) as r:
            return json.load(r)
    except Exception:
        return None
said = set()
def say(what):
    if what not in said:
        said.add(what)
        print(json.dumps({"at": time.time(), "what": what}), flush=True)
deadline = time.time() + 300
while time.time() < deadline:
    hosts = get(f"{disc}/services/flynn-host/instances") or []
    if hosts and not any(h.get("meta", {}).get("id") == lost for h in hosts):
        say("left discoverd")
    leader = get(f"{disc}/services/controller-scheduler/leader")
    state = get(f"http://{leader['addr']}/debug/state") if leader else None
    if state and lost not in state.get("hosts", {}):
        say("given up")
    # any controller discoverd names (the one the bench used may have been on the lost host)
    ctls = get(f"{disc}/services/controller/instances") or []
    jobs = (get(f"http://{ctls[0]['addr']}/apps/{app}/jobs", auth) if ctls else None) or []
    up = [j for j in jobs if j.get("state") == "up" and j.get("type") == "web"]
    if "given up" in said and len(up) == n and not any(j["id"].startswith(lost + "-") for j in up):
        say("replaced")
        break
    time.sleep(0.2)
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def new_cluster(prefix: str) -> Cluster:
    for i in range(50):
        c = Cluster(f"{prefix}{i}")
        try:
            c._check_subnet_free()
        except ClusterError:
            continue
        if not c.exists():
            return c
    raise SystemExit(f"no free cluster name {prefix}N")


class Bench:
    def __init__(self, c: Cluster, home: Path) -> None:
        self.c = c
        self.home = home
        self.url, self.key, _ = cluster_controller(c)

    def flynn(self, *args: str) -> str:
        env = {"HOME": str(self.home), "FLYNNRC": str(self.home / ".flynnrc")}
        out = self.c.exec(1, [FLYNN, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(self.home))  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"flynn {' '.join(args)}: {out.stdout}{out.stderr}")
        return str(out.stdout + out.stderr)

    def app_jobs(self, active: bool = True) -> list[dict[str, Any]]:
        """The hosts' jobs of the app (not ended, with `active`)."""
        out = []
        for h in self.c.hosts:
            if not h.pid:
                continue
            for job in self.c.client(h.index).list_jobs().values():
                meta = job["job"].get("metadata") or {}
                if meta.get("flynn-controller.app_name") == APP and (
                    not active or job["status"] not in ENDED
                ):
                    out.append(job)
        return out

    # --- the scheduler ----------------------------------------------------------------------
    def scale(self, n: int) -> dict[str, float]:
        started = time.monotonic()
        out = self.flynn("-a", APP, "scale", f"web={n}")
        wall = time.monotonic() - started
        m = re.search(r"scale completed in (\S+)", out)
        assert m, out
        return {"completed_s": go_seconds(m.group(1)), "wall_s": wall}

    def scale_to_zero(self) -> None:
        self.flynn("-a", APP, "scale", "web=0")
        wait_for(lambda: self.app_jobs() == [], 60, "every job of the app ended", every=0.2)

    # --- the hosts directly -----------------------------------------------------------------
    def templates(self) -> dict[str, dict[str, Any]]:
        """Per host, the JSON of a job the scheduler started there (the layers' paths in its
        mountspecs are the host's own)."""
        return {j["job"]["id"].split("-")[0]: j["job"] for j in self.app_jobs()}

    def direct(self, templates: dict[str, dict[str, Any]], n: int) -> float:
        return asyncio.run(self._direct(templates, n))

    async def _direct(self, templates: dict[str, dict[str, Any]], n: int) -> float:
        hosts = self.c.hosts
        key = self.c.key or ""
        headers = {"Authorization": "Basic " + base64.b64encode(f":{key}".encode()).decode()}
        jobs = []
        for i in range(n):
            h = hosts[i % len(hosts)]
            job = copy.deepcopy(templates[h.id])
            job["id"] = f"{h.id}-{uuid.uuid4()}"
            job["config"]["env"]["FLYNN_JOB_ID"] = job["id"]
            job["metadata"] = {"bench": "direct"}
            jobs.append((h, job))
        waiting = {job["id"] for _, job in jobs}
        done = asyncio.Event()
        async with aiohttp.ClientSession(headers=headers) as s:
            ready = [asyncio.Event() for _ in hosts]

            async def follow(i: int) -> None:
                sse = {**headers, "Accept": "text/event-stream"}
                async with s.get(hosts[i].url + "/host/jobs", headers=sse,
                                 timeout=aiohttp.ClientTimeout(total=None)) as resp:  # fmt: skip
                    ready[i].set()
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        job = event.get("job") or {}
                        job_id = (job.get("job") or {}).get("id")
                        if job.get("status") == "running" and job_id in waiting:
                            waiting.discard(job_id)
                            if not waiting:
                                done.set()

            followers = [asyncio.create_task(follow(i)) for i in range(len(hosts))]
            await asyncio.gather(*(e.wait() for e in ready))
            started = time.monotonic()

            async def put(h: Any, job: dict[str, Any]) -> None:
                # a host takes a few starts at a time and answers 429 ("retry shortly") to more
                while True:
                    async with s.put(f"{h.url}/host/jobs/{job['id']}", json=job) as resp:
                        if resp.status == 200:
                            return
                        if resp.status != 429:
                            raise RuntimeError(f"{h.id}: {resp.status} {await resp.text()}")
                    await asyncio.sleep(RETRY_429)

            await asyncio.gather(*(put(h, job) for h, job in jobs))
            await asyncio.wait_for(done.wait(), 120)
            took = time.monotonic() - started
            for f in followers:
                f.cancel()
            await asyncio.gather(*(s.delete(f"{h.url}/host/jobs/{job['id']}")
                                   for h, job in jobs), return_exceptions=True)  # fmt: skip
        for h, job in jobs:
            self._wait_ended(h.index, job["id"])
        return took

    def _wait_ended(self, host: int, job_id: str) -> None:
        client = self.c.client(host)
        wait_for(lambda: client.get_job(job_id)["status"] in ENDED, 60, every=0.1)

    # --- losing a host ------------------------------------------------------------------------
    def host_loss(self, n: int) -> dict[str, Any]:
        disc = f"http://{self.c.ips()[0]}:1111"
        # not the PostgreSQL primary's host: the controller would be away for its fail-over
        leader = self._get_json(1, f"{disc}/services/postgres/leader")
        pg_host = leader["meta"]["FLYNN_JOB_ID"].split("-")[0] if leader else ""
        victim = next(h for h in self.c.hosts[1:] if h.id != pg_host)
        # nor the scheduler leader's: its standby would take over and never have known the
        # host, which is another path (the standby test's)
        for _ in range(5):
            leader = self._get_json(1, f"{disc}/services/controller-scheduler/leader")
            job_id = leader["meta"]["FLYNN_JOB_ID"] if leader else ""
            if not job_id.startswith(victim.id + "-"):
                break
            say(f"the scheduler's leader is on {victim.id}: stopping it for its standby")
            self.c.client(victim.index).stop_job(job_id)
            self._wait_leader_moved(disc, job_id)
        on_victim = [j for j in self.app_jobs() if j["job"]["id"].startswith(victim.id + "-")]
        argv = ["nsenter", f"--net={self.c.host(1).netns_path}", "--", sys.executable, "-c",
                WATCHER, disc, self.key, APP, victim.id, str(n)]  # fmt: skip
        watcher = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1)  # the watcher is polling
            killed = time.time()
            self.c.stop_host(victim.index, kill=True, remove_namespace=True)
            seen: dict[str, float] = {}
            assert watcher.stdout is not None
            for line in watcher.stdout:
                event = json.loads(line)
                seen[event["what"]] = event["at"] - killed
            watcher.wait(timeout=300)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        return {"host": victim.id, "jobs_on_it": len(on_victim), "jobs": n,
                "left_discoverd_s": seen.get("left discoverd"),
                "given_up_s": seen.get("given up"), "replaced_s": seen.get("replaced")}  # fmt: skip

    def _wait_leader_moved(self, disc: str, job_id: str) -> None:
        def moved() -> bool:
            leader = self._get_json(1, f"{disc}/services/controller-scheduler/leader")
            return bool(leader) and leader["meta"]["FLYNN_JOB_ID"] != job_id

        wait_for(moved, 60, "another scheduler leading", every=0.5)

    def _get_json(self, i: int, url: str) -> Any:
        out = self.c.exec(i, [sys.executable, "-c", GET, url], capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None


def go_seconds(text: str) -> float:
    """Go's duration string (`869.3ms`, `3.94s`, `1m2.5s`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
    return sum(float(v) * units[u] for v, u in re.findall(r"([\d.]+)(ms|µs|us|ns|h|m|s)", text))


def run(jobs: int, rounds: int) -> dict[str, Any]:
    c = new_cluster("bsc")
    home = Path(c.base) / f"{c.name}-home"
    try:
        say(f"booting a 3-host cluster ({c.name})")
        c.up(3, bootstrap=True, host_id_prefix=f"{c.name}h")
        home.mkdir(parents=True, exist_ok=True)
        b = Bench(c, home)
        b.flynn("cluster", "add", "--no-git", "default", b.url, b.key)
        b.flynn("create", APP)
        (home / "release.json").write_text(json.dumps(RELEASE))
        b.flynn("-a", APP, "release", "add", "-t", "flynn", "-f", str(home / "release.json"),
                BUSYBOX)  # fmt: skip
        say("warm-up: scale and direct")
        b.scale(jobs)
        templates = b.templates()
        assert len(templates) == 3, "the scheduler placed jobs on every host"
        b.scale_to_zero()
        b.direct(templates, jobs)
        scaled, direct = [], []
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}: flynn scale web={jobs}, then {jobs} jobs directly")
            scaled.append(b.scale(jobs))
            b.scale_to_zero()
            direct.append(b.direct(templates, jobs))
        say(f"host loss with web={jobs}")
        b.scale(jobs)
        loss = b.host_loss(jobs)
    finally:
        c.down()
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return {"jobs": jobs, "rounds": rounds, "scale": scaled, "direct_s": direct, "loss": loss}


def print_result(r: dict[str, Any]) -> None:
    completed = statistics.median(s["completed_s"] for s in r["scale"])
    wall = statistics.median(s["wall_s"] for s in r["scale"])
    direct = statistics.median(r["direct_s"])
    n = r["jobs"]
    print(f"scheduler, 3 hosts, 0 -> {n} busybox jobs, median of {r['rounds']} rounds")
    print(f"  flynn scale web={n} (formation PUT -> last up event at the CLI) {completed:6.2f}s"
          f"   {completed / direct:.2f}x")  # fmt: skip
    print(f"  flynn scale web={n}, the command's wall time                   {wall:6.2f}s"
          f"   {wall / direct:.2f}x")  # fmt: skip
    print(f"  reference: {n} jobs PUT directly on the hosts -> all running   {direct:6.2f}s"
          "   1x")  # fmt: skip
    print("  each round: scale " + ", ".join(f"{s['completed_s']:.2f}s" for s in r["scale"])
          + "; direct " + ", ".join(f"{d:.2f}s" for d in r["direct_s"]))  # fmt: skip
    loss = r["loss"]

    def fmt(v: float | None) -> str:
        return f"{v:.1f}s" if v is not None else "never"

    replaced = (
        loss["replaced_s"] - loss["given_up_s"] if loss["replaced_s"] and loss["given_up_s"]
        else None
    )  # fmt: skip
    print(f"host loss ({loss['host']} killed whole, {loss['jobs_on_it']} of {loss['jobs']} jobs "
          "on it)")  # fmt: skip
    print(f"  detection: kill -> given up by the scheduler {fmt(loss['given_up_s'])} "
          f"(of which kill -> out of discoverd {fmt(loss['left_discoverd_s'])})")  # fmt: skip
    print(f"  replacement: given up -> {loss['jobs']} jobs up again, none on it {fmt(replaced)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the cluster is removed
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(args.jobs, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
