"""The controller's bootstrap actions, `add-app` and `add-provider`, against a stand-in
controller found through a stand-in discoverd: what they send, with which key, and that a
rerun changes nothing."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from flynn_controller.bootstrap import AddApp, AddProvider, controller_key
from flynn_controller.bootstrap_deploy import DeployApp

from flynn_host.bootstrap import State, StepError
from tests.bootstrap_fakes import IMAGE_SOURCE, host_state, services

KEY = "k" * 32


class FakeController:
    """The few routes bootstrap uses, in memory, behind HTTP Basic auth with `KEY`."""

    def __init__(self) -> None:
        self.apps: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}
        self.releases: dict[str, dict[str, Any]] = {}
        self.formations: dict[tuple[str, str], dict[str, Any]] = {}
        self.providers: list[dict[str, Any]] = []
        self.resources: dict[str, dict[str, Any]] = {}
        self.jobs: list[dict[str, Any]] = []  # what GET /apps/:app/jobs answers (newest first)

    def app(self, ref: str) -> dict[str, Any] | None:
        return next((a for a in self.apps.values() if ref in (a["id"], a["name"])), None)

    def __call__(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        auth = headers.get("Authorization", "")
        if base64.b64decode(auth.removeprefix("Basic ")).decode() != f":{KEY}":
            return 401, None
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["apps", ref]:
                found = self.app(ref)
                return (200, found) if found else (404, {"code": "not_found", "message": "no"})
            case "POST", ["apps"]:
                if self.app(body["name"]):
                    return 409, {"code": "already_exists", "message": "exists"}
                self.apps[body["id"]] = body
                return 200, body
            case "POST", ["artifacts"]:
                self.artifacts[body["id"]] = body
                return 200, body
            case "GET", ["releases", rid]:
                found = self.releases.get(rid)
                return (200, found) if found else (404, {"code": "not_found", "message": "no"})
            case "POST", ["releases"]:
                body.setdefault("id", str(uuid.uuid4()))
                self.releases[body["id"]] = body
                return 200, body
            case "PUT", ["apps", ref, "release"]:
                app = self.app(ref)
                assert app and body["id"] in self.releases
                app["release"] = body["id"]
                return 200, app
            case "PUT", ["apps", ref, "formations", rid]:
                self.formations[(ref, rid)] = body
                return 200, body
            case "GET", ["apps", ref, "jobs"]:
                return 200, self.jobs
            case "GET", ["providers"]:
                return 200, self.providers
            case "PUT", ["providers", name, "resources", rid]:
                assert any(p["name"] == name for p in self.providers)
                self.resources[rid] = {**body, "id": rid, "provider": name}
                return 200, self.resources[rid]
            case "POST", ["providers", name, "resources"]:
                # what a provider gives: a database, its credentials in the resource's env
                rid = str(uuid.uuid4())
                self.resources[rid] = {"id": rid, "provider": name, "apps": body["apps"],
                                       "env": {"PGDATABASE": f"db{len(self.resources)}",
                                               "PGPASSWORD": f"secret-{rid}"}}  # fmt: skip
                return 201, self.resources[rid]
            case "POST", ["providers"]:
                provider = {**body, "id": str(uuid.uuid4())}
                self.providers.append(provider)
                return 200, provider
        return 404, {"code": "not_found", "message": path}


def run_app_data(name: str = "controller", env: dict[str, str] | None = None) -> dict[str, Any]:
    """What a run-app step's data looks like."""
    return {
        "app": {"id": str(uuid.uuid4()), "name": name, "meta": {"flynn-system-app": "true"}},
        "release": {
            "id": str(uuid.uuid4()),
            "env": env if env is not None else {"AUTH_KEY": f"{KEY},other", "X": "1"},
            "processes": {"web": {"args": ["a"], "ports": [{"port": 80, "service": name}]}},
        },
        "artifact": {"image": "components", "id": "img-id", "uri": IMAGE_SOURCE},
        "processes": {"web": 1},
        "resources": [
            {
                "name": "postgres",
                "url": "http://postgres-api.discoverd/databases",
                "id": "/databases/u:d",
                "env": {"PGPASSWORD": "p" * 16},
            }
        ],
    }


def test_add_app_registers_what_run_app_started() -> None:
    ctl = FakeController()
    with services(ctl, known=("controller",)) as svc:
        state, _ = host_state(svc.url)
        state.step_data["controller"] = data = run_app_data()
        step = {"id": "inception", "action": "add-app", "from_step": "controller",
                "app": {"strategy": "one-by-one", "deploy_timeout": 120}}  # fmt: skip
        out = AddApp(step).run(state)
        app_id, release_id = data["app"]["id"], data["release"]["id"]
        assert ctl.apps[app_id] == {
            "id": app_id,
            "name": "controller",
            "meta": {"flynn-system-app": "true"},
            "strategy": "one-by-one",
            "deploy_timeout": 120,
            "release": release_id,
        }
        (artifact,) = ctl.artifacts.values()
        assert artifact["type"] == "flynn" and artifact["uri"] == IMAGE_SOURCE
        assert artifact["meta"] == {"flynn.image": "components", "flynn.image_id": "img-id"}
        release = ctl.releases[release_id]
        assert release["artifact"] == artifact["id"] and release["env"] == data["release"]["env"]
        # a port's service name becomes the object the controller's schema wants
        port = release["processes"]["web"]["ports"][0]
        assert port["service"] == {"name": "controller", "create": True}
        assert ctl.formations[(app_id, release_id)]["processes"] == {"web": 1}
        assert out["controller_url"] == svc.url and out["controller_key"] == KEY
        # the resource run-app provisioned, and its provider, as Flynn's add-app records them
        (provider,) = ctl.providers
        assert provider["name"] == "postgres"
        (resource,) = ctl.resources.values()
        assert resource["external_id"] == "/databases/u:d" and resource["apps"] == [app_id]
        assert resource["env"] == {"PGPASSWORD": "p" * 16}
        assert out["app"]["id"] == app_id and out["release"]["id"] == release_id

        # a rerun makes nothing new
        calls = len(svc.calls)
        AddApp(step).run(state)
        assert len(ctl.apps) == 1 and len(ctl.artifacts) == 1 and len(ctl.releases) == 1
        assert len(ctl.providers) == 1 and len(ctl.resources) == 1
        assert [c for c in svc.calls[calls:] if c[0] != "GET"] == []
        # an app registered but without a release yet (an interrupted run) is completed
        ctl.apps[app_id].pop("release")
        ctl.formations.clear()
        AddApp(step).run(state)
        assert ctl.apps[app_id]["release"] == release_id and len(ctl.releases) == 1
        assert ctl.formations[(app_id, release_id)]["processes"] == {"web": 1}


def test_the_key_is_the_running_controllers() -> None:
    state = State(hosts=[])
    state.step_data["controller-key"] = {"data": "from-gen-random"}
    assert controller_key(state) == "from-gen-random"
    state.step_data["controller"] = run_app_data()
    assert controller_key(state) == KEY
    with pytest.raises(StepError, match="no controller key"):
        controller_key(State(hosts=[]))


def test_a_wrong_key_says_so() -> None:
    ctl = FakeController()
    with services(ctl, known=("controller",)) as svc:
        state, _ = host_state(svc.url)
        state.step_data["controller"] = run_app_data(env={"AUTH_KEY": "wrong-key"})
        with pytest.raises(StepError, match="401 unauthorized"):
            AddApp({"id": "a", "action": "add-app", "from_step": "controller"}).run(state)


def test_add_provider_once() -> None:
    ctl = FakeController()
    with services(ctl, known=("controller",)) as svc:
        state, _ = host_state(svc.url)
        state.step_data["controller-key"] = {"data": KEY}
        step = {"id": "p", "action": "add-provider", "name": "postgres",
                "url": "http://postgres-api.discoverd/databases"}  # fmt: skip
        first = AddProvider(step).run(state)
        again = AddProvider(step).run(state)
        assert first == again and len(ctl.providers) == 1
        assert first["url"] == "http://postgres-api.discoverd/databases"


@pytest.mark.parametrize(
    ("cls", "step", "message"),
    [
        (AddApp, {}, "from_step must name the run-app step"),
        (AddApp, {"from_step": "x", "app": []}, "app must be an object"),
        (AddApp, {"from_step": "x", "app": {"strategy": "fast"}}, "app.strategy 'fast' is not"),
        (AddApp, {"from_step": "x", "app": {"deploy_timeout": "1"}}, "deploy_timeout must be"),
        (AddProvider, {"url": "http://x/"}, "name must be set"),
        (AddProvider, {"name": "pg", "url": "x"}, "url must be the provider's URL"),
    ],
)
def test_bad_fields(cls: type, step: dict[str, Any], message: str) -> None:
    with pytest.raises(StepError, match=message):
        cls({"id": "s", "action": "x", **step})


def test_add_app_needs_the_run_app_step() -> None:
    state = State(hosts=[])
    with pytest.raises(StepError, match="step 'nope' has no run-app data"):
        AddApp({"id": "a", "action": "add-app", "from_step": "nope"}).run(state)


DEPLOY_ROUTER = {
    "id": "router",
    "action": "deploy-app",
    "app": {"name": "router", "meta": {"flynn-system-app": "true"}},
    "artifact": {"image": "components"},
    "release": {"env": {"A": "1"},
                "processes": {"app": {"args": ["router"], "omni": True, "host_network": True}}},
    "processes": {"app": 1},
}  # fmt: skip


def controller_state(svc: Any) -> State:
    state, _ = host_state(svc.url)
    state.step_data["controller-key"] = {"data": KEY}
    return state


def test_deploy_app_makes_the_app_through_the_controller_and_waits_for_its_jobs() -> None:
    ctl = FakeController()
    with services(ctl, known=("controller",)) as svc:
        state = controller_state(svc)
        # the scheduler has started the omni job on the one host
        ctl.jobs = [{"id": "h-1", "type": "app", "state": "up", "release": None}]
        original = ctl.__call__

        def answering(method: str, path: str, headers: dict[str, str], body: Any) -> Any:
            status, out = original(method, path, headers, body)
            if method == "PUT" and "/formations/" in path:
                ctl.jobs[0]["release"] = body["release"]
            return status, out

        svc.handle = answering
        out = DeployApp(DEPLOY_ROUTER).run(state)
        (app,) = ctl.apps.values()
        assert app["name"] == "router" and app["release"] == out["release"]["id"]
        release = ctl.releases[app["release"]]
        assert release["env"] == {"A": "1"} and release["processes"]["app"]["omni"] is True
        assert ctl.formations[(app["id"], app["release"])]["processes"] == {"app": 1}
        # a rerun leaves the deployed app as it is
        DeployApp(DEPLOY_ROUTER).run(state)
        assert len(ctl.apps) == 1 and len(ctl.releases) == 1


def test_deploy_app_fails_at_once_with_the_hosts_reason_when_its_jobs_keep_failing() -> None:
    ctl = FakeController()
    with services(ctl, known=("controller",)) as svc:
        state = controller_state(svc)
        original = ctl.__call__

        def failing(method: str, path: str, headers: dict[str, str], body: Any) -> Any:
            status, out = original(method, path, headers, body)
            if method == "PUT" and "/formations/" in path:
                ctl.jobs = [{"id": f"h-{i}", "type": "app", "state": "failed",
                             "release": body["release"], "host_error": "rlimit: not permitted"}
                            for i in range(3)]  # fmt: skip
            return status, out

        svc.handle = failing
        with pytest.raises(StepError, match="3 jobs of router ended failed.*rlimit: not permitted"):
            DeployApp(DEPLOY_ROUTER).run(state)


DEPLOY_BLOBSTORE = {
    "id": "blobstore",
    "action": "deploy-app",
    "app": {"name": "blobstore", "meta": {"flynn-system-app": "true"}, "strategy": "one-by-one"},
    "artifact": {"image": "components"},
    "release": {"processes": {"web": {"args": ["blobstore"],
                                      "ports": [{"port": 80, "service": "blobstore"}]}}},
    "processes": {"web": 2},
    "resources": [{"name": "postgres"}],
}  # fmt: skip


def test_deploy_app_provisions_its_resources_into_the_release() -> None:
    ctl = FakeController()
    with services(ctl, known=("controller",)) as svc:
        state = controller_state(svc)
        original = ctl.__call__

        def answering(method: str, path: str, headers: dict[str, str], body: Any) -> Any:
            status, out = original(method, path, headers, body)
            if method == "PUT" and "/formations/" in path:
                ctl.jobs = [{"id": f"h-{i}", "type": "web", "state": "up",
                             "release": body["release"]} for i in range(2)]  # fmt: skip
            return status, out

        svc.handle = answering
        out = DeployApp(DEPLOY_BLOBSTORE).run(state)
        (app,) = ctl.apps.values()
        assert app["name"] == "blobstore" and app["strategy"] == "one-by-one"
        (resource,) = ctl.resources.values()
        assert resource["provider"] == "postgres" and resource["apps"] == [app["id"]]
        # the database's env is the release's, and its password is kept out of the output
        release = ctl.releases[app["release"]]
        assert release["env"] == resource["env"]
        assert resource["env"]["PGPASSWORD"] in state.secrets
        assert out["resources"] == [resource]
        assert ctl.formations[(app["id"], app["release"])]["processes"] == {"web": 2}
        # a rerun provisions nothing more
        DeployApp(DEPLOY_BLOBSTORE).run(state)
        assert len(ctl.resources) == 1 and len(ctl.releases) == 1


def test_deploy_app_resources_need_a_provider_name() -> None:
    with pytest.raises(StepError, match="expected"):
        DeployApp({**DEPLOY_BLOBSTORE, "resources": [{"url": "http://x"}]})
