"""The controller's bootstrap actions: `add-app` and `add-provider` (Flynn's), which hand what
bootstrap started by itself over to the controller once it answers.

`add-app` — `{"from_step": "<run-app step id>", "app": {"strategy": ..., "deploy_timeout": ...}}`:
registers the app that `run-app` step started (its jobs run already, outside any scheduler) so
the controller knows it as it is: `POST /apps` (the run-app step's app id, name and meta, plus
`strategy` and `deploy_timeout`), `POST /artifacts`, `POST /releases` (the run-app step's
release id, its env as the jobs run with it and its process types), `PUT /apps/:app/release`
and `PUT /apps/:app/formations/:release` (the counts run-app started); each resource the
run-app step provisioned is recorded (`PUT /providers/:name/resources/:id` with the app, after
`POST /providers` when the provider is not known yet, as Flynn's add-app does). The **artifact** is
`{"type": "flynn", "uri": <manifest URL>}`: the URL the hosts imported the run-app step's
image from (`source` of `GET /host/images/<name>`, e.g.
`file:///var/lib/flynn/images/components/manifest.json`), with meta `flynn.image` (the name
jobs use in the hosts' image stores) and `flynn.image_id` (the manifest's sha512_256 id).
A rerun changes nothing that exists: an app the controller has with a current release is left
as it is (a deploy or scale made since must not be undone), an app found by name is reused,
and when the run-app step's release is already known, no artifact or release is made again.

`add-provider` — `{"name": "postgres", "url": "http://postgres-api.discoverd/databases"}`:
`POST /providers` unless a provider of that name exists.

Both call the controller at `http://controller.discoverd` (resolved through discoverd's API,
`flynn_host.bootstrap.services`) with the key it runs with: the first of `AUTH_KEY` in the
env of the run-app step that started the app `controller` (on a rerun, the running
controller's key, which a rerun of `gen-random` does not know), else the `controller-key`
step's data. `add-app`'s step data records the controller's address and key
(`controller_url`, `controller_key`) for the closing `log` step.
"""

from __future__ import annotations

import uuid
from typing import Any

from flynn_controller.types import STRATEGIES
from flynn_host.bootstrap import Action, State, StepError, services

CONTROLLER_URL = "http://controller.discoverd"
KEY_STEP = "controller-key"


def controller_key(state: State) -> str:
    """The key the controller runs with (see the module docstring)."""
    for data in state.step_data.values():
        if isinstance(data, dict) and (data.get("app") or {}).get("name") == "controller":
            keys = ((data.get("release") or {}).get("env") or {}).get("AUTH_KEY") or ""
            if keys.split(",")[0]:
                return str(keys.split(",")[0])
    data = state.step_data.get(KEY_STEP)
    if isinstance(data, dict) and data.get("data"):
        return str(data["data"])
    raise StepError(
        f"no controller key: neither a run-app step of the app controller with AUTH_KEY nor "
        f"a {KEY_STEP!r} step has run"
    )


class Controller:
    """The controller's API as bootstrap reaches it."""

    def __init__(self, state: State, url: str = CONTROLLER_URL) -> None:
        self.state = state
        self.url = url.rstrip("/")
        self.key = controller_key(state)
        self.base = ""  # the instance that answered last, `http://ip:port`

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        """The parsed answer; StepError unless its status is in `ok`."""
        resp = self.call_raw(method, path, body)
        if resp.status not in ok:
            raise StepError(f"controller: {method} {path}: {services.describe(resp)}")
        return resp.body

    def call_raw(self, method: str, path: str, body: Any = None) -> services.Response:
        resp = services.request(self.state, method, self.url + path, body, key=self.key)
        self.base = resp.base
        if resp.status == 401:
            raise StepError(
                f"controller: {method} {path}: 401 unauthorized (the controller does not take "
                "the key bootstrap has: was it started by another bootstrap?)"
            )
        return resp


def _process_type(proc: dict[str, Any]) -> dict[str, Any]:
    """A run-app process type as a release's: a port's `service` given as a name becomes the
    object the controller's schema wants (as run-app gives it to the host)."""
    out = dict(proc)
    ports = []
    for p in proc.get("ports") or []:
        port = dict(p)
        if isinstance(port.get("service"), str):
            port["service"] = {"name": port["service"], "create": True}
        ports.append(port)
    if "ports" in proc:
        out["ports"] = ports
    return out


class AddApp(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.from_step = step.get("from_step")
        if not isinstance(self.from_step, str) or not self.from_step:
            raise StepError("from_step must name the run-app step that started the app")
        self.app = {} if step.get("app") is None else step["app"]
        if not isinstance(self.app, dict):
            raise StepError('app must be an object ({"strategy", "deploy_timeout"})')
        strategy = self.app.get("strategy")
        if strategy is not None and strategy not in STRATEGIES:
            raise StepError(f"app.strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        timeout = self.app.get("deploy_timeout")
        if timeout is not None and (
            not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1
        ):
            raise StepError(f"app.deploy_timeout must be a number of seconds, not {timeout!r}")

    def run_app_data(self, state: State) -> dict[str, Any]:
        data = state.step_data.get(str(self.from_step))
        if not isinstance(data, dict) or not isinstance(data.get("app"), dict):
            raise StepError(f"step {self.from_step!r} has no run-app data (has it run yet?)")
        return data

    def run(self, state: State) -> Any:
        data = self.run_app_data(state)
        ctl = Controller(state)
        name = data["app"]["name"]
        app = self.ensure_app(ctl, data)
        out = {"app": app, "controller_url": ctl.base, "controller_key": ctl.key}
        if app.get("release"):
            # registered before: the controller owns it now (a deploy or a scale since then
            # must not be undone by a rerun of bootstrap)
            state.progress(f"app {name} is registered already (release {app['release']})")
            return {**out, "release": {"id": app["release"]}, "artifact": None,
                    "formation": None, "resources": []}  # fmt: skip
        release_id = data["release"]["id"]
        found = ctl.call_raw("GET", f"/releases/{release_id}")
        if found.status == 200:
            state.progress(f"release {release_id} of {name} is known already")
            release = found.body
            artifact = {"id": release.get("artifact")}
        else:
            artifact = self.create_artifact(ctl, data)
            release = ctl.call(
                "POST",
                "/releases",
                {
                    "id": release_id,
                    "artifact": artifact["id"],
                    "env": data["release"].get("env") or {},
                    "processes": {
                        t: _process_type(p)
                        for t, p in (data["release"].get("processes") or {}).items()
                    },
                },
                ok=(200, 201),
            )
        resources = [self.record_resource(ctl, app, r) for r in data.get("resources") or []]
        ctl.call("PUT", f"/apps/{app['id']}/release", {"id": release_id}, ok=(200, 201))
        formation = ctl.call(
            "PUT",
            f"/apps/{app['id']}/formations/{release_id}",
            {"app": app["id"], "release": release_id, "processes": data.get("processes") or {}},
            ok=(200, 201),
        )
        return {
            **out,
            "release": {"id": release_id, "artifact": release.get("artifact")},
            "artifact": artifact,
            "formation": formation,
            "resources": resources,
        }

    def ensure_app(self, ctl: Controller, data: dict[str, Any]) -> dict[str, Any]:
        """The app, created unless one of that name exists (then it is reused as it is)."""
        return self.ensure_app_named(ctl, {**data["app"], **self.app})

    @staticmethod
    def ensure_app_named(ctl: Controller, app: dict[str, Any]) -> dict[str, Any]:
        """App `app["name"]`: the controller's, else a new one with `app`'s id, meta,
        strategy and deploy_timeout."""
        name = app["name"]
        found = ctl.call_raw("GET", f"/apps/{name}")
        if found.status == 200 and isinstance(found.body, dict):
            return found.body
        body = {
            "id": app["id"],
            "name": name,
            "meta": app.get("meta") or {},
            **{k: v for k, v in app.items() if k in ("strategy", "deploy_timeout")},
        }
        resp = ctl.call_raw("POST", "/apps", body)
        if resp.status in (200, 201) and isinstance(resp.body, dict):
            return resp.body
        if resp.status == 409:  # made meanwhile (a concurrent rerun)
            return dict(ctl.call("GET", f"/apps/{name}"))
        raise StepError(f"controller: POST /apps ({name}): {services.describe(resp)}")

    @staticmethod
    def record_resource(ctl: Controller, app: dict[str, Any], r: dict[str, Any]) -> Any:
        """The resource run-app provisioned, in the controller (its provider too)."""
        ensure_provider(ctl, r["name"], r["url"])
        # the same id for the same database: a second record replaces the first
        rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{r['url']}#{r.get('id')}")
        body = {"external_id": str(r.get("id") or ""), "env": r.get("env") or {},
                "apps": [app["id"]]}  # fmt: skip
        return ctl.call("PUT", f"/providers/{r['name']}/resources/{rid}", body, ok=(200, 201))

    @staticmethod
    def create_artifact(ctl: Controller, data: dict[str, Any]) -> dict[str, Any]:
        image = data.get("artifact") or {}
        if not image.get("uri"):
            raise StepError(
                f"the run-app data of {data['app']['name']} names no image manifest URI"
            )
        body = {
            "id": str(uuid.uuid4()),
            "type": "flynn",
            "uri": image["uri"],
            "meta": {"flynn.image": str(image.get("image", "")),
                     "flynn.image_id": str(image.get("id", ""))},
        }  # fmt: skip
        return dict(ctl.call("POST", "/artifacts", body, ok=(200, 201)))


class AddProvider(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.name, self.url = step.get("name"), step.get("url")
        if not isinstance(self.name, str) or not self.name:
            raise StepError("name must be set (the provider's name, e.g. postgres)")
        if not isinstance(self.url, str) or "://" not in self.url:
            raise StepError("url must be the provider's URL (http://...)")

    def run(self, state: State) -> Any:
        return ensure_provider(Controller(state), str(self.name), str(self.url))


def ensure_provider(ctl: Controller, name: str, url: str) -> dict[str, Any]:
    """Provider `name`: the one the controller has, else a new one at `url`."""

    def find() -> dict[str, Any] | None:
        for p in ctl.call("GET", "/providers") or []:
            if isinstance(p, dict) and p.get("name") == name:
                return p
        return None

    if existing := find():
        ctl.state.progress(f"provider {name} exists already")
        return existing
    resp = ctl.call_raw("POST", "/providers", {"name": name, "url": url})
    if resp.status in (200, 201) and isinstance(resp.body, dict):
        return resp.body
    if resp.status == 409 and (existing := find()):
        return existing
    raise StepError(f"controller: POST /providers ({name}): {services.describe(resp)}")


class StartScheduler(Action):
    """`scheduler` — `{"from_step": "controller", "processes": {"web": 2, "scheduler": 1}}`:
    the hand-over from bootstrap to the scheduler. It sets the controller's formation to
    `processes` (in singleton mode every count above 1 becomes 1) and starts the `scheduler`
    process type itself, as `run-app` would (one job per host, it is omni). From then on the
    scheduler owns every job of every app the controller knows, the system apps' included: it
    adopts the jobs bootstrap started and starts what the formations still miss. Run it after
    every `add-app` step: a job of an app the controller does not know yet is left alone, but
    its formation would otherwise be missing. A rerun changes nothing that runs."""

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.from_step = step.get("from_step") or "controller"
        processes = step.get("processes") or {}
        if not isinstance(processes, dict) or "scheduler" not in processes:
            raise StepError('processes must give the controller\'s counts, "scheduler" among them')
        self.processes = {str(k): int(v) for k, v in processes.items()}

    def run(self, state: State) -> Any:
        from flynn_host.bootstrap.runapp import RunApp

        data = state.step_data.get(str(self.from_step))
        if not isinstance(data, dict) or not isinstance(data.get("app"), dict):
            raise StepError(f"step {self.from_step!r} has no run-app data (has it run yet?)")
        release = data["release"]
        procs = release.get("processes") or {}
        for typ in self.processes:
            if typ not in procs:
                raise StepError(f"process type {typ!r} is not in the {self.from_step} release")
        counts = {t: min(c, 1) if state.singleton else c for t, c in self.processes.items()}
        ctl = Controller(state)
        app_id, release_id = data["app"]["id"], release["id"]
        current = ctl.call_raw("GET", f"/apps/{app_id}/formations/{release_id}")
        have = (current.body or {}).get("processes") if current.status == 200 else None
        if have != counts:
            state.progress(f"scaling {data['app']['name']}: " + ", ".join(
                f"{t}={n}" for t, n in sorted(counts.items())))  # fmt: skip
            body = {"app": app_id, "release": release_id, "processes": counts}
            ctl.call("PUT", f"/apps/{app_id}/formations/{release_id}", body)
        state.progress("starting the scheduler")
        step = {"id": self.id, "action": "run-app", "app": data["app"],
                "release": {k: v for k, v in release.items() if k != "processes"}
                | {"processes": procs},
                "artifact": {"image": (data.get("artifact") or {}).get("image")},
                "processes": {"scheduler": counts["scheduler"]}}  # fmt: skip
        started = RunApp(step).run(state)
        return {"processes": counts, "started": started.get("started", [])}
