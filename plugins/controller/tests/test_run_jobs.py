"""`POST /apps/:app/jobs` on a controller without hosts: what it refuses before it needs one
(Flynn's error JSON, also for an attach request, which then gets no 101), the clear error when
the cluster has no host, and the host job a NewJob becomes (`runjobs.new_host_job`). Running
jobs on real hosts is tested in `test_run_jobs_cluster.py`."""

from __future__ import annotations

from typing import Any

from controller_http import Api
from flynn_controller.runjobs import new_host_job

ATTACH = {"Upgrade": "flynn-attach/0", "Connection": "Upgrade"}
UUID = "7d3ab6e2-1e4b-4c8f-9d61-0a9f4e0c2b11"


def app(api: Api, name: str, meta: dict[str, str] | None = None) -> dict[str, Any]:
    return api.ok("POST", "/apps", {"name": name, "meta": meta})


def release(api: Api, artifact: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"env": {"FROM_RELEASE": "1"}}
    if artifact:
        uri = "file:///var/lib/flynn/images/busybox/manifest.json"
        body["artifact"] = api.ok("POST", "/artifacts", {"type": "flynn", "uri": uri})["id"]
    return api.ok("POST", "/releases", body)


def error(api: Api, path: str, body: object, headers: dict[str, str]) -> tuple[int, Any]:
    r = api("POST", path, body, headers=headers)
    assert r.content_type == "application/json", r
    return r.status, r.json()


def test_bad_new_jobs_are_validation_errors(api: Api) -> None:
    app(api, "runner")
    bare = release(api, artifact=False)
    for headers in ({}, ATTACH):
        assert api("POST", "/apps/nosuchapp/jobs", {"release": UUID}, headers=headers).status == 404
        cases: list[tuple[object, str, str]] = [
            ({}, "release", "release is required"),
            ({"release": UUID}, "release", f"release could not find release with ID {UUID}"),
            ({"release": "nope"}, "release", "release could not find release with ID nope"),
            ({"release": bare["id"]}, "release", f"release {bare['id']} has no artifact to run"),
            ({"release": UUID, "cmd": "ls"}, "cmd", "cmd must be of type array or null"),
            ({"release": UUID, "tty_columns": -1}, "tty_columns", "tty_columns must be at least 0"),
            ({"release": UUID, "env": {"A": 1}}, "env.A", "env.A must be of type string"),
        ]
        for body, field, message in cases:
            status, err = error(api, "/apps/runner/jobs", body, headers)
            assert status == 400 and err["code"] == "validation_error", (body, err)
            assert (err["message"], err["detail"]) == (message, {"field": field})
        status, err = error(api, "/apps/runner/jobs", "{not json", headers)
        assert (status, err["code"]) == (400, "syntax_error")


def test_without_hosts_the_answer_says_so(api: Api) -> None:
    """A valid NewJob (with another app's release, as `flynn pg` sends) reaches the choice of
    a host: none here, which is a clear unknown_error, not a stack trace."""
    app(api, "lonely")
    other = app(api, "other-owner")
    rel = release(api)
    api.ok("PUT", f"/apps/{other['id']}/release", {"id": rel["id"]})
    for headers in ({}, ATTACH):
        body = {"release": rel["id"], "cmd": ["true"], "release_env": True}
        status, err = error(api, "/apps/lonely/jobs", body, headers)
        assert status == 500, err
        assert (err["code"], err["message"], err["retry"]) == (
            "unknown_error",
            "no hosts are available to run the job",
            False,
        )


IMAGE = {
    "manifest": {"entrypoints": {"_default": {"env": {"PATH": "/bin"}, "args": ["/bin/sh"]}}},
    "mountspecs": [{"id": "layer"}],
}
PRIVILEGED_RELEASE = {
    "id": UUID,
    "env": {"FROM_RELEASE": "1"},
    "processes": {
        "": {"host_network": True, "linux_capabilities": ["CAP_SYS_ADMIN"], "env": {"X": "y"}},
        "app": {"host_network": True, "partition": "system"},
    },
}


def test_a_user_apps_one_off_job_is_never_privileged() -> None:
    user = {"id": "a1", "name": "web", "meta": {}}
    system = {"id": "s1", "name": "postgres", "meta": {"flynn-system-app": "true"}}
    body = {"release": UUID, "cmd": ["id"], "release_env": True, "env": {"MINE": "1"},
            "meta": {"flynn-controller.app": "forged", "note": "x"}}  # fmt: skip
    job = new_host_job("h1-job", user, PRIVILEGED_RELEASE, IMAGE, body, attached=True)
    cfg = job["config"]
    assert job["partition"] == "user"
    assert not cfg.get("host_network") and not cfg.get("linux_capabilities")
    assert cfg["args"] == ["id"] and cfg["stdin"] is True and cfg["tty"] is False
    assert cfg["env"]["FROM_RELEASE"] == "1" and cfg["env"]["MINE"] == "1"
    assert cfg["env"]["FLYNN_APP_ID"] == "a1" and cfg["env"]["FLYNN_PROCESS_TYPE"] == ""
    assert cfg["env"]["FLYNN_JOB_ID"] == "h1-job" and cfg["env"]["FLYNN_RELEASE_ID"] == UUID
    assert job["metadata"]["flynn-controller.app"] == "a1" and job["metadata"]["note"] == "x"
    assert job["resources"]["memory"]["limit"] == 1024**3
    assert job["resources"]["max_fd"]["limit"] == 10000

    # without release_env the release's env stays out; detached means no stdin and no tty
    body = {"release": UUID, "entrypoint": ["psql"], "cmd": ["-c", "x"], "tty": True}
    job = new_host_job("h1-job2", system, PRIVILEGED_RELEASE, IMAGE, body, attached=False)
    assert "FROM_RELEASE" not in job["config"]["env"]
    assert job["config"]["args"] == ["psql", "-c", "x"]
    assert job["config"]["stdin"] is False and job["config"]["tty"] is False


def test_a_slug_apps_one_off_command_runs_through_slugrunner() -> None:
    user = {"id": "a1", "name": "web", "meta": {}}
    slug = {"id": UUID, "meta": {"git": "true"}, "processes": {}}
    body = {"release": UUID, "cmd": ["rails", "console"], "release_env": True}
    job = new_host_job("h1-job", user, slug, IMAGE, body, attached=True)
    assert job["config"]["args"] == ["/runner/init", "rails", "console"]
    # an explicit entrypoint (`flynn run -e`) is taken as given
    body = {"release": UUID, "entrypoint": ["/bin/sh"], "cmd": ["-c", "id"]}
    job = new_host_job("h1-job", user, slug, IMAGE, body, attached=True)
    assert job["config"]["args"] == ["/bin/sh", "-c", "id"]
    # not a slug release: the command replaces the image's
    body = {"release": UUID, "cmd": ["id"]}
    job = new_host_job("h1-job", user, PRIVILEGED_RELEASE, IMAGE, body, attached=True)
    assert job["config"]["args"] == ["id"]
