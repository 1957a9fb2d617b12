"""A stand-in for the scheduler, for tests of the controller without hosts: it follows the
controller's active formations (polling `GET /formations?active=true`) and reports jobs
for them through `PUT /apps/:app/jobs/:id` as the real scheduler does, without running
anything. A missing job is reported `starting`, then `up`; a surplus one (the newest first)
`down`. A job of a release whose env says `CRASH=1` goes `starting` → `crashed` and is
replaced on the next round (a crash loop); with `HANG=1` it stays `starting`.

It tests the controller's side of deployments (the deployer's strategies, waits, rollbacks)
and nothing of the scheduler's; the real scheduler is tested on hosts. Jobs of earlier
stand-ins found in the controller (host `standin`) are taken over, so stand-ins may follow
each other on one controller.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

HOST = "standin"
ALIVE = ("starting", "up")


class SchedulerStandIn:
    def __init__(self, url: str, key: str, interval: float = 0.05, hosts: int = 1) -> None:
        self.url = url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f":{key}".encode()).decode()
        self.interval = interval
        self.hosts = hosts  # omni types run count × hosts jobs
        # (app id, release id, type) -> ids of the jobs it runs, oldest first
        self.jobs: dict[tuple[str, str, str], list[str]] = {}
        self.adopted: set[str] = set()
        self.paused = threading.Event()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler-standin", daemon=True)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", self.auth)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.paused.is_set():
                continue
            try:
                self.rectify()
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self.errors.append(str(exc))  # the controller restarting: try again

    def report(self, app: str, job_id: str, release: str, typ: str, state: str) -> None:
        body = {"id": job_id, "app": app, "release": release, "type": typ, "state": state}
        self._call("PUT", f"/apps/{app}/jobs/{job_id}", body)

    def _adopt(self, app: str) -> None:
        if app in self.adopted:
            return
        for job in reversed(self._call("GET", f"/apps/{app}/jobs") or []):
            if job["id"].startswith(HOST + "-") and job.get("state") in ALIVE:
                key = (app, job["release"], job["type"])
                self.jobs.setdefault(key, []).append(job["id"])
        self.adopted.add(app)

    def rectify(self) -> None:
        """One round: make the jobs match the active formations."""
        want: dict[tuple[str, str, str], int] = {}
        env: dict[str, dict[str, Any]] = {}
        for f in self._call("GET", "/formations?active=true") or []:
            app, release = f["app"]["id"], f["release"]["id"]
            self._adopt(app)
            env[release] = f["release"].get("env") or {}
            for typ, count in (f.get("processes") or {}).items():
                omni = ((f["release"].get("processes") or {}).get(typ) or {}).get("omni")
                want[(app, release, typ)] = count * (self.hosts if omni else 1)
        for key in sorted(set(want) | set(self.jobs)):
            app, release, typ = key
            running = self.jobs.setdefault(key, [])
            while len(running) > want.get(key, 0):
                self.report(app, running.pop(), release, typ, "down")
            while len(running) < want.get(key, 0):
                job_id = f"{HOST}-{uuid.uuid4()}"
                self.report(app, job_id, release, typ, "starting")
                if env[release].get("CRASH") == "1":
                    self.report(app, job_id, release, typ, "crashed")
                    break  # replaced next round, like the scheduler's restart
                if env[release].get("HANG") != "1":
                    self.report(app, job_id, release, typ, "up")
                running.append(job_id)


@contextlib.contextmanager
def scheduler_standin(url: str, key: str, **kw: Any) -> Iterator[SchedulerStandIn]:
    """A running stand-in for the scheduler of the controller at `url`, stopped afterwards
    (its jobs stay as reported, as when a scheduler stops)."""
    s = SchedulerStandIn(url, key, **kw)
    s.start()
    try:
        yield s
    finally:
        s.stop()
