"""`run-app`'s resources (provisioned from a provider found through discoverd, merged into the
release env, not provisioned again when the app runs, secrets redacted) and what its step data
tells `add-app`; the `log` action and step data named by Go field names."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from flynn_host.bootstrap import runapp
from flynn_host.bootstrap import services as bootstrap_services
from flynn_host.bootstrap.genrandom import GenRandom
from flynn_host.bootstrap.log import Log
from flynn_host.bootstrap.output import json_logger, text_logger
from flynn_host.bootstrap.runapp import RunApp
from flynn_host.bootstrap.runner import State, StepError, run_steps
from flynn_host.bootstrap.template import TemplateError, json_keys, render

from .bootstrap_fakes import IMAGE_SOURCE, host_state, services

PASSWORD = "0123456789abcdef0123456789abcdef"
DB_ENV = {
    "FLYNN_POSTGRES": "postgres",
    "PGHOST": "leader.postgres.discoverd",
    "PGUSER": "u0123456789",
    "PGPASSWORD": PASSWORD,
    "PGDATABASE": "d0123456789",
    "DATABASE_URL": f"postgres://u0123456789:{PASSWORD}@leader.postgres.discoverd:5432/d0123456789",
}


@pytest.fixture(autouse=True)
def quick_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runapp, "STARTED_AFTER", 0.0)


def provider(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
    if (method, path) == ("POST", "/databases") and body == {}:
        return 200, {"id": "/databases/u0123456789:d0123456789", "env": DB_ENV}
    if path == "/broken":
        return 500, {"code": "server_error", "message": "no primary"}
    return 404, {"code": "not_found", "message": path}


def app_step(**extra: Any) -> dict[str, Any]:
    return {
        "id": "controller",
        "action": "run-app",
        "app": {"name": "controller", "meta": {"flynn-system-app": "true"}},
        "artifact": {"image": "components"},
        "release": {
            "env": {"AUTH_KEY": '{{ (index .StepData "key").Data }}', "DOMAIN": "x.example"},
            "processes": {"web": {"args": ["x"], "env": {"OWN": "1"}}},
        },
        "processes": {"web": 2},
        "resources": [{"name": "postgres", "url": "http://postgres-api.discoverd/databases"}],
        **extra,
    }


def test_resources_are_provisioned_into_the_env_once() -> None:
    with services(provider, known=("postgres-api",)) as svc:
        out = io.StringIO()
        state, host = host_state(svc.url, emit=json_logger(out), singleton=True)
        steps = [{"id": "key", "action": "gen-random"}, app_step()]
        assert run_steps(steps, {"gen-random": GenRandom, "run-app": RunApp}, state)
        assert svc.calls == [("POST", "/databases", {})]
        (job,) = host.jobs.values()  # singleton: web x2 becomes 1
        env = job["job"]["config"]["env"]
        key = state.step_data["key"]["data"]
        assert env["PGPASSWORD"] == PASSWORD and env["AUTH_KEY"] == key and env["OWN"] == "1"
        data = state.step_data["controller"]
        assert data["processes"] == {"web": 1}
        assert data["release"]["env"] == {"AUTH_KEY": key, "DOMAIN": "x.example", **DB_ENV}
        assert data["artifact"] == {"image": "components", "id": "components-id",
                                    "uri": IMAGE_SOURCE}  # fmt: skip
        (res,) = data["resources"]
        assert res["id"] == "/databases/u0123456789:d0123456789" and res["env"] == DB_ENV
        # the output: no password, no key; the rest as it is
        text = out.getvalue()
        assert PASSWORD not in text and key not in text
        done = [json.loads(line) for line in text.splitlines()][-1]["data"]
        shown = done["release"]["env"]
        assert shown["PGPASSWORD"] == "(secret)" and shown["PGHOST"] == DB_ENV["PGHOST"]
        assert "(secret)" in shown["DATABASE_URL"]
        assert done["resources"][0]["env"]["PGPASSWORD"] == "(secret)"

        # a rerun (a new gen-random value, the job still running) provisions nothing and
        # reports the env the job runs with, its secrets still hidden
        out2 = io.StringIO()
        rerun = State(hosts=state.hosts, emit=json_logger(out2), singleton=True)
        assert run_steps(steps, {"gen-random": GenRandom, "run-app": RunApp}, rerun)
        assert len(svc.calls) == 1 and len(host.jobs) == 1
        again = rerun.step_data["controller"]
        assert again["release"]["env"]["AUTH_KEY"] == key != rerun.step_data["key"]["data"]
        assert again["release"]["env"]["PGPASSWORD"] == PASSWORD and again["resources"] == []
        assert again["release"]["id"] == data["release"]["id"]
        assert PASSWORD not in out2.getvalue() and key not in out2.getvalue()


def test_a_type_without_running_jobs_gets_the_running_release_env() -> None:
    with services(provider, known=("postgres-api",)) as svc:
        state, host = host_state(svc.url)
        step = app_step()
        step["release"]["env"]["AUTH_KEY"] = "k" * 20
        RunApp(step).run(state)
        step["release"]["processes"]["worker"] = {"args": ["y"]}
        step["processes"] = {"web": 2, "worker": 1}
        RunApp(step).run(state)
        assert len(svc.calls) == 1
        (worker,) = [j for j in host.jobs.values() if j["job"]["config"]["args"] == ["y"]]
        env = worker["job"]["config"]["env"]
        assert env["PGPASSWORD"] == PASSWORD and "OWN" not in env
        assert env["FLYNN_PROCESS_TYPE"] == "worker"


def test_a_provider_that_fails_fails_the_step_before_any_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with services(provider, known=("postgres-api",)) as svc:
        state, host = host_state(svc.url)
        step = app_step(resources=[{"name": "pg", "url": "http://postgres-api.discoverd/broken"}])
        with pytest.raises(
            StepError, match="provisioning pg from .*: 500 server_error: no primary"
        ):
            RunApp(step).run(state)
        assert host.jobs == {}
        step = app_step(resources=[{"name": "pg", "url": "http://nothere.discoverd/x"}])
        monkeypatch.setattr(bootstrap_services, "RETRY_FOR", 0.0)
        with pytest.raises(StepError, match="no answer: discoverd has no service nothere"):
            RunApp(step).run(state)


@pytest.mark.parametrize(
    "resources",
    [[{"name": "pg"}], [{"url": "http://x/"}], ["postgres"], [{"name": "pg", "url": "x"}]],
)
def test_bad_resources(resources: list[Any]) -> None:
    with pytest.raises(StepError, match="expected"):
        RunApp(app_step(resources=resources))


# --- log and step data by Go field names ---------------------------------------------------------


def test_json_keys() -> None:
    assert json_keys("Data") == ["Data", "data"]
    assert json_keys("CACert")[-1] == "ca_cert"
    assert json_keys("ControllerURL")[-1] == "controller_url"
    assert json_keys("PrivateKey")[-1] == "private_key"
    data = {"StepData": {"c": {"ca_cert": "CA", "pin": "P"}}}
    assert render('{{ (index .StepData "c").CACert }}/{{ (index .StepData "c").Pin }}', data) == (
        "CA/P"
    )
    with pytest.raises(TemplateError, match="has no field Cert"):
        render('{{ (index .StepData "c").Cert }}', data)


def test_escaped_getenv_is_json_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYNN_TEST_PEM", 'a\nb "c"\\')
    assert render('{{ getenv \\"FLYNN_TEST_PEM\\" }}', {}) == 'a\\nb \\"c\\"\\\\'
    assert render('{{ getenv "FLYNN_TEST_PEM" }}', {}) == 'a\nb "c"\\'


@pytest.mark.parametrize("logger", [json_logger, text_logger])
def test_log_shows_its_message_secrets_included(logger: Any) -> None:
    out = io.StringIO()
    s = State(hosts=[], emit=logger(out))
    steps = [
        {"id": "key", "action": "gen-random"},
        {"id": "done", "action": "log", "output": 'add: {{ (index .StepData "key").Data }}'},
    ]
    assert run_steps(steps, {"gen-random": GenRandom, "log": Log}, s)
    key = s.step_data["key"]["data"]
    text = out.getvalue()
    assert text.count(key) == 1 and f"add: {key}" in text
    if logger is text_logger:
        assert f"log done add: {key}" in text
    with pytest.raises(StepError, match="output must be a string"):
        Log({"id": "x", "action": "log"})
