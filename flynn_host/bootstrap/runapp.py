"""Flynn's `run-app` bootstrap action (registered by `flynn_host.plugins.bootstrap_actions`).

`run-app` starts an app's jobs directly on the hosts, bypassing any scheduler, as Flynn's
bootstrap does. Its artifact is an image in each host's image store (`GET /host/images/<name>`
gives the layers), not a URL. It provisions the app's `resources` (a database from a provider
API) into the release's env first. It is safe to rerun: a host already running a job of the
same app and process type counts towards the wanted number, and an app whose jobs run keeps
their env (its resources are not provisioned again).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from flynn_host.bootstrap import services
from flynn_host.bootstrap.actions import host_call
from flynn_host.bootstrap.joblog import job_failure
from flynn_host.bootstrap.runner import Action, ClusterHost, State, StepError
from flynn_host.client import HostAPIError

# process type fields copied into the job's config as they are
CONFIG_FIELDS = (
    "args",
    "host_network",
    "host_pid_namespace",
    "host_bundle",
    "working_dir",
    "uid",
    "gid",
    "linux_capabilities",
    "writeable_cgroups",
    "allowed_devices",
    "disable_log",
    "data",
    "seccomp",
    "no_new_privileges",
)
FINISHED = ("done", "crashed", "failed")
# env keys whose values no output may show (a provisioned resource's password, a key)
SECRET_KEY_RE = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.I)
# shorter values are not taken as secrets: hiding "" or "1" everywhere would garble the output
MIN_SECRET = 8
# how long a job must keep running before run-app counts it as started
STARTED_AFTER = 1.0


def _port(p: dict[str, Any]) -> dict[str, Any]:
    """A release's port as the host's job config wants it (`service` may be just a name)."""
    out = {"port": p.get("port", 0), "proto": p.get("proto") or "tcp"}
    service = p.get("service")
    if isinstance(service, str):
        out["service"] = {"name": service, "create": True}
    elif isinstance(service, dict):
        out["service"] = service
    return out


class RunApp(Action):
    """Flynn's `run-app`: `{"app": {"name", "meta"}, "release": {"env", "processes"},
    "artifact": {"image": NAME}, "processes": {TYPE: COUNT}, "resources": [{"name", "url"}]}`.
    Omni process types run COUNT jobs on every host; others are spread over the hosts in turn.
    In singleton mode every count above 1 becomes 1. Each resource is provisioned (`POST {}`
    to its provider URL, answering `{"id", "env"}`) and its env merged into the release's
    before any job starts, unless the app's jobs already run."""

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.app = dict(step.get("app") or {})
        if not self.app.get("name"):
            raise StepError("app.name must be set")
        self.release = dict(step.get("release") or {})
        self.procs: dict[str, Any] = self.release.get("processes") or {}
        artifact = step.get("artifact") or (step.get("artifacts") or [None])[0] or {}
        self.image = artifact.get("image") if isinstance(artifact, dict) else None
        if not self.image:
            raise StepError("artifact.image must name an image in the hosts' image stores")
        self.counts = {k: int(v) for k, v in (step.get("processes") or {}).items()}
        self.running_env: dict[str, dict[str, str] | None] = {}
        for typ in self.counts:
            if typ not in self.procs:
                raise StepError(f"process type {typ!r} is not in release.processes")
        self.resources = step.get("resources") or []
        for r in self.resources:
            name, url = (r.get("name"), r.get("url")) if isinstance(r, dict) else (None, None)
            if not (isinstance(name, str) and isinstance(url, str) and "://" in url):
                raise StepError(f'resource {r!r}: expected {{"name": NAME, "url": "http://..."}}')
        self.images: dict[str, dict[str, Any]] = {}

    # --- placement ---------------------------------------------------------------------------
    def existing(self, state: State) -> dict[str, dict[str, list[str]]]:
        """host id -> type -> ids of this app's active jobs there (what a rerun keeps). The
        env of each type's running jobs is kept too: a rerun starts the missing jobs of the
        release it finds, whose generated secrets a rerun of `gen-random` would not match."""
        out: dict[str, dict[str, list[str]]] = {}
        for host in state.hosts:
            jobs = host_call(host, "listing jobs", "GET", "/host/jobs?active=true") or {}
            for jid, job in jobs.items():
                meta = (job.get("job") or {}).get("metadata") or {}
                if meta.get("flynn-controller.app_name") != self.app["name"]:
                    continue
                if job.get("status") not in ("starting", "running"):
                    continue
                self.app.setdefault("id", meta.get("flynn-controller.app"))
                self.release.setdefault("id", meta.get("flynn-controller.release"))
                typ = meta.get("flynn-controller.type", "")
                out.setdefault(host.id, {}).setdefault(typ, []).append(jid)
                self.running_env.setdefault(typ, (job["job"].get("config") or {}).get("env"))
        return out

    def placements(
        self, state: State, have: dict[str, dict[str, list[str]]]
    ) -> list[tuple[ClusterHost, str]]:
        out = []
        for typ, count in sorted(self.counts.items()):
            if state.singleton and count > 1:
                count = 1
            running = {h.id: len(have.get(h.id, {}).get(typ, [])) for h in state.hosts}
            if self.procs[typ].get("omni"):
                for host in state.hosts:
                    out += [(host, typ)] * max(0, count - running[host.id])
                continue
            missing = count - sum(running.values())
            for _ in range(max(0, missing)):
                # the host with the fewest jobs of this type, in turn
                host = min(state.hosts, key=lambda h: (running[h.id], state.hosts.index(h)))
                running[host.id] += 1
                out.append((host, typ))
        return out

    # --- jobs --------------------------------------------------------------------------------
    def job(
        self, state: State, host: ClusterHost, typ: str, mountspecs: list[Any]
    ) -> dict[str, Any]:
        proc = self.procs[typ]
        job_id = f"{host.id}-{uuid.uuid4().hex}"
        env = {**(self.release.get("env") or {}), **(proc.get("env") or {})}
        env.update(self.running_env.get(typ) or {})
        env.update(
            {
                "FLYNN_APP_ID": self.app["id"],
                "FLYNN_APP_NAME": self.app["name"],
                "FLYNN_RELEASE_ID": self.release["id"],
                "FLYNN_PROCESS_TYPE": typ,
                "FLYNN_JOB_ID": job_id,
            }
        )
        config: dict[str, Any] = {k: proc[k] for k in CONFIG_FIELDS if k in proc}
        config["env"] = {k: str(v) for k, v in env.items()}
        config["ports"] = [_port(p) for p in proc.get("ports") or []]
        config["volumes"] = []
        for vol in proc.get("volumes") or []:
            meta = {
                "flynn-controller.app": self.app["id"],
                "flynn-controller.app_name": self.app["name"],
                "flynn-controller.type": typ,
                "flynn-controller.path": vol["path"],
            }
            created = host_call(
                host,
                f"creating the volume for {vol['path']}",
                "POST",
                "/storage/providers/default/volumes",
                {"meta": meta},
            )
            config["volumes"].append(
                {
                    "target": vol["path"],
                    "volume": created["id"],
                    "writeable": True,
                    "delete_on_stop": bool(vol.get("delete_on_stop")),
                }
            )
        job = {
            "id": job_id,
            "mountspecs": mountspecs,
            "metadata": {
                "flynn-controller.app": self.app["id"],
                "flynn-controller.app_name": self.app["name"],
                "flynn-controller.release": self.release["id"],
                "flynn-controller.type": typ,
            },
            "resources": proc.get("resources") or {},
            "config": config,
        }
        if proc.get("partition"):
            job["partition"] = proc["partition"]
        return job

    def start(self, state: State, host: ClusterHost, job: dict[str, Any]) -> None:
        deadline = time.monotonic() + state.job_timeout
        while True:
            try:
                host.client.add_job(job)
                return
            except HostAPIError as exc:
                # over the host's job concurrency: wait for a start to finish, as Flynn retries
                if exc.code != "ratelimited" or time.monotonic() > deadline:
                    raise StepError(f"host {host}: starting job {job['id']}: {exc}") from None
            except (ConnectionError, OSError) as exc:
                raise StepError(f"host {host}: starting job {job['id']}: {exc}") from None
            time.sleep(0.2)

    def wait_started(self, state: State, started: list[tuple[ClusterHost, str]]) -> None:
        """Until every job left `starting`; a job that crashed or failed fails the step."""
        deadline = time.monotonic() + state.job_timeout
        pending = list(started)
        next_report = time.monotonic() + 5
        running_since: dict[str, float] = {}
        while pending:
            for host, jid in list(pending):
                job = host_call(host, f"inspecting job {jid}", "GET", f"/host/jobs/{jid}")
                status = job.get("status")
                if status == "running":
                    # a program that is missing or dies at once still reaches `running` (its
                    # init started): count the job once it has kept running for a moment
                    since = running_since.setdefault(jid, time.monotonic())
                    if time.monotonic() - since >= STARTED_AFTER:
                        pending.remove((host, jid))
                elif status == "done":
                    pending.remove((host, jid))
                elif status in ("crashed", "failed"):
                    raise StepError(job_failure(host, jid, job))
            if not pending:
                return
            if time.monotonic() > deadline:
                ids = ", ".join(f"{jid} on {host}" for host, jid in pending)
                raise StepError(
                    f"timed out after {state.job_timeout:g}s waiting for jobs to start: {ids}"
                )
            if time.monotonic() > next_report:
                state.progress(f"waiting for {len(pending)} job(s) to start")
                next_report = time.monotonic() + 5
            time.sleep(0.1)

    def mountspecs(self, host: ClusterHost) -> list[Any]:
        """The layers of the step's image in `host`'s image store."""
        return list(self.image_record(host)["mountspecs"])

    def image_record(self, host: ClusterHost) -> dict[str, Any]:
        """`GET /host/images/<image>` on `host`: its id, `source` (the manifest URL it was
        imported from) and `mountspecs`."""
        if host.id in self.images:
            return self.images[host.id]
        try:
            record = host.client.request("GET", f"/host/images/{self.image}")
            self.images[host.id] = record
            return dict(record)
        except HostAPIError as exc:
            if exc.status != 404:
                raise StepError(f"host {host}: finding image {self.image!r}: {exc}") from None
            raise StepError(
                f"host {host} has no image {self.image!r}: import it there first, e.g. "
                f"`flynn-host image import /var/lib/flynn/images/{self.image}/manifest.json "
                f"--name={self.image}` (`make images` builds it)"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise StepError(f"host {host}: finding image {self.image!r}: {exc}") from None

    # --- resources and env ---------------------------------------------------------------------
    def provision(self, state: State) -> list[dict[str, Any]]:
        """Each resource from its provider: `{"name", "url", "id", "env"}`."""
        out = []
        for r in self.resources:
            state.progress(f"provisioning {r['name']} from {r['url']}")
            resp = services.request(state, "POST", r["url"], {})
            body = resp.body
            if (
                resp.status not in (200, 201)
                or not isinstance(body, dict)
                or not isinstance(body.get("env"), dict)
            ):
                raise StepError(
                    f"provisioning {r['name']} from {r['url']}: {services.describe(resp)}"
                )
            env = {str(k): str(v) for k, v in body["env"].items()}
            for k, v in env.items():
                if SECRET_KEY_RE.search(k) and len(v) >= MIN_SECRET:
                    state.secrets.add(v)
            out.append({"name": r["name"], "url": r["url"], "id": body.get("id"), "env": env})
        return out

    def started_env(self, state: State) -> dict[str, str]:
        """The release env the app's jobs run with: the step's, or when jobs already run,
        theirs (without what their process type or the host added). Values that stand where
        the step has a secret, or under a secret-looking key, are secrets too."""
        env = {k: str(v) for k, v in (self.release.get("env") or {}).items()}
        for typ, running in self.running_env.items():
            own = set((self.procs.get(typ) or {}).get("env") or {})
            for k, v in (running or {}).items():
                if k not in own and not k.startswith("FLYNN_"):
                    env[k] = v
        steps = self.release.get("env") or {}
        for k, v in env.items():
            was_secret = k in steps and state.redact(str(steps[k])) != str(steps[k])
            if (was_secret or SECRET_KEY_RE.search(k)) and len(v) >= MIN_SECRET:
                state.secrets.add(v)
        return env

    def artifact(self, state: State) -> dict[str, Any]:
        """The image as a later step registers it: its name, id and manifest URL (`uri`)."""
        record = self.image_record(state.hosts[0])
        return {"image": self.image, "id": record.get("id"), "uri": record.get("source")}

    def run(self, state: State) -> Any:
        have = self.existing(state)
        self.app.setdefault("id", None)
        self.app["id"] = self.app["id"] or str(uuid.uuid4())
        self.release["id"] = self.release.get("id") or str(uuid.uuid4())
        resources: list[dict[str, Any]] = []
        if self.resources and have:
            state.progress("the app's jobs run: keeping their env, provisioning nothing")
        elif self.resources:
            resources = self.provision(state)
            env = dict(self.release.get("env") or {})
            for r in resources:
                env.update(r["env"])
            self.release["env"] = env
        self.release["env"] = self.started_env(state)
        mountspecs: dict[str, list[Any]] = {}
        started: list[tuple[ClusterHost, str]] = []
        for host, typ in self.placements(state, have):
            if host.id not in mountspecs:
                mountspecs[host.id] = self.mountspecs(host)
            job = self.job(state, host, typ, mountspecs[host.id])
            self.start(state, host, job)
            started.append((host, job["id"]))
            have.setdefault(host.id, {}).setdefault(typ, []).append(job["id"])
        self.wait_started(state, started)
        counts = {t: min(c, 1) if state.singleton else c for t, c in self.counts.items()}
        return {
            "app": self.app,
            "release": {**self.release, "processes": self.procs},
            "artifact": self.artifact(state) if state.hosts else {"image": self.image},
            "processes": counts,
            "resources": resources,
            "jobs": {h: [j for ids in types.values() for j in ids] for h, types in have.items()},
            "started": [jid for _, jid in started],
        }
