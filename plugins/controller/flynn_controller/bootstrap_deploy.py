"""The controller's bootstrap actions that go through the controller once the scheduler runs:
`deploy-app` and `add-route` (Flynn's).

`deploy-app` — `{"app": {"name", "meta", "strategy", "deploy_timeout"}, "artifact": {"image":
NAME}, "release": {"env", "processes"}, "processes": {TYPE: COUNT}, "resources": [{"name"}]}`:
creates the app, an artifact for the image (the manifest URL the hosts imported it from, as
`add-app` records it), provisions each resource from the controller's provider of that name
(its env joins the release's), creates the release, makes it the app's and sets its formation;
the scheduler starts the jobs, and the step waits until they are up (an omni process's on every
host), up to `--job-timeout` (at least 60 s). It fails at once, with the host's reason, when
jobs of the release keep failing: the scheduler would restart them with its backoff and the
steps after would only time out. In singleton mode every count above 1 becomes 1. A rerun
changes nothing: an app that has a release is left as it is.

`add-route` — `{"app_step": STEP, "cert_step": STEP, "route": {"type": "http", "service",
"domain", ...}}`: adds the route to the app that step `app_step` (an `add-app` or `deploy-app`
step) registered; with `cert_step` (a `gen-tls-cert` step) the route serves that certificate.
A route that exists already (409) is kept.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flynn_controller.bootstrap import AddApp, Controller
from flynn_controller.types import STRATEGIES
from flynn_host.bootstrap import Action, State, StepError, services


class DeployApp(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        from flynn_host.bootstrap.runapp import RunApp

        self.app = dict(step.get("app") or {})
        if not isinstance(self.app.get("name"), str) or not self.app["name"]:
            raise StepError("app.name must be set")
        strategy = self.app.get("strategy")
        if strategy is not None and strategy not in STRATEGIES:
            raise StepError(f"app.strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        # run-app's checks of the release, counts and image, and its image lookup
        self.runapp = RunApp({**step, "action": "run-app", "resources": []})
        self.resources = step.get("resources") or []
        for r in self.resources:
            if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                raise StepError(f'resource {r!r}: expected {{"name": PROVIDER}}')

    def run(self, state: State) -> Any:
        ctl = Controller(state)
        name = self.app["name"]
        found = ctl.call_raw("GET", f"/apps/{name}")
        if found.status == 200 and isinstance(found.body, dict) and found.body.get("release"):
            state.progress(f"app {name} is deployed already (release {found.body['release']})")
            return {"app": found.body, "release": {"id": found.body["release"]}}
        image = self.runapp.artifact(state)
        app = AddApp.ensure_app_named(ctl, {"id": str(uuid.uuid4()), **self.app})
        artifact = AddApp.create_artifact(ctl, {"app": app, "artifact": image})
        env = {k: str(v) for k, v in (self.runapp.release.get("env") or {}).items()}
        resources = []
        for r in self.resources:
            state.progress(f"provisioning {r['name']} for {name}")
            resource = ctl.call(
                "POST", f"/providers/{r['name']}/resources", {"apps": [app["id"]]}, ok=(200, 201)
            )
            for k, v in (resource.get("env") or {}).items():
                env[str(k)] = str(v)
                if "PASSWORD" in k or "KEY" in k:
                    state.secrets.add(str(v))
            resources.append(resource)
        release = ctl.call(
            "POST",
            "/releases",
            {"artifact": artifact["id"], "env": env, "processes": self.runapp.procs},
            ok=(200, 201),
        )
        ctl.call("PUT", f"/apps/{app['id']}/release", {"id": release["id"]}, ok=(200, 201))
        counts = {t: min(c, 1) if state.singleton else c for t, c in self.runapp.counts.items()}
        formation = ctl.call(
            "PUT",
            f"/apps/{app['id']}/formations/{release['id']}",
            {"app": app["id"], "release": release["id"], "processes": counts},
            ok=(200, 201),
        )
        state.progress(f"deployed {name}: " + ", ".join(f"{t}={n}" for t, n in counts.items()))
        self.wait_up(state, ctl, app, release["id"], counts)
        return {
            "app": app,
            "release": {"id": release["id"], "artifact": artifact["id"]},
            "formation": formation,
            "resources": resources,
        }

    def wait_up(
        self, state: State, ctl: Controller, app: dict[str, Any], release: str,
        counts: dict[str, int],
    ) -> None:  # fmt: skip
        """Until the scheduler reports the formation's jobs up; StepError when
        `FAILURES_TO_GIVE_UP` of its jobs ended failed or crashed before that."""
        hosts = len(state.hosts)
        want = {t: n * hosts if self.runapp.procs[t].get("omni") else n for t, n in counts.items()}
        deadline = time.monotonic() + max(60.0, state.job_timeout)
        next_note = time.monotonic() + 5
        while True:
            jobs = [j for j in ctl.call("GET", f"/apps/{app['id']}/jobs") or []
                    if j.get("release") == release]  # fmt: skip
            up = {t: sum(1 for j in jobs if j.get("type") == t and j.get("state") == "up")
                  for t in want}  # fmt: skip
            if all(up[t] >= n for t, n in want.items()):
                return
            bad = [j for j in jobs if j.get("state") in ("crashed", "failed")]
            if len(bad) >= FAILURES_TO_GIVE_UP:
                last = bad[0]  # newest first
                why = last.get("host_error") or f"exit status {last.get('exit_status')}"
                raise StepError(f"{len(bad)} jobs of {app['name']} ended {last.get('state')}; "
                                f"the last, {last.get('id')}: {why}")  # fmt: skip
            if time.monotonic() > deadline:
                raise StepError(f"timed out waiting for {app['name']}'s jobs to be up: "
                                f"{up} of {want}")  # fmt: skip
            if time.monotonic() > next_note:
                state.progress(f"waiting for jobs to be up: {up} of {want}")
                next_note = time.monotonic() + 5
            time.sleep(0.2)


FAILURES_TO_GIVE_UP = 3


class AddRoute(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.app_step = step.get("app_step")
        if not isinstance(self.app_step, str) or not self.app_step:
            raise StepError("app_step must name the add-app or deploy-app step of the app")
        self.cert_step = step.get("cert_step") or ""
        self.route = step.get("route")
        if not isinstance(self.route, dict) or self.route.get("type") not in ("http", "tcp"):
            raise StepError('route must be a route object with "type": "http" or "tcp"')

    def run(self, state: State) -> Any:
        data = state.step_data.get(str(self.app_step))
        app = data.get("app") if isinstance(data, dict) else None
        if not isinstance(app, dict) or not app.get("id"):
            raise StepError(f"step {self.app_step!r} has no app (has it run yet?)")
        route = dict(self.route or {})
        if self.cert_step:
            cert = state.step_data.get(str(self.cert_step))
            if not isinstance(cert, dict) or not cert.get("cert"):
                raise StepError(f"step {self.cert_step!r} has no certificate (has it run yet?)")
            route.update(tls_cert=cert["cert"], tls_key=cert["key"])
        ctl = Controller(state)
        resp = ctl.call_raw("POST", f"/apps/{app['id']}/routes", route)
        if resp.status == 409:
            state.progress(f"route {route.get('domain') or route.get('port')} exists already")
            detail = (resp.body or {}).get("detail") if isinstance(resp.body, dict) else None
            return {"route": detail}
        if resp.status not in (200, 201):
            raise StepError(f"controller: POST /apps/{app['name']}/routes: "
                            f"{services.describe(resp)}")  # fmt: skip
        return {"route": resp.body}
