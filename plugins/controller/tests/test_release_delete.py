"""`DELETE /apps/:app/releases/:id`: what a push that failed to deploy leaves is taken away
(gitreceive calls it), never what an app runs."""

from __future__ import annotations

from typing import Any

from controller_http import Api


def _release(api: Api, uri: str) -> dict[str, Any]:
    artifact = api.ok("POST", "/artifacts", {"type": "flynn", "uri": uri})
    return api.ok("POST", "/releases", {"artifact": artifact["id"], "processes": {"web": {}}})


def test_a_release_the_app_does_not_run_is_deleted_with_its_own_artifact(api: Api) -> None:
    app = api.ok("POST", "/apps", {"name": "pushed"})
    current = _release(api, "http://blobstore.discoverd/slugs/images/current.json")
    api.ok("PUT", f"/apps/{app['id']}/release", {"id": current["id"]})
    failed = _release(api, "http://blobstore.discoverd/slugs/images/failed.json")
    api.ok("PUT", f"/apps/{app['id']}/formations/{failed['id']}",
           {"app": app["id"], "release": failed["id"], "processes": {"web": 0}})  # fmt: skip

    r = api("DELETE", f"/apps/pushed/releases/{current['id']}")
    assert r.status == 400 and "current release" in r.json()["message"]

    api.ok("DELETE", f"/apps/pushed/releases/{failed['id']}")
    assert api("GET", f"/releases/{failed['id']}").status == 404
    assert api("GET", f"/artifacts/{failed['artifact']}").status == 404
    assert api("GET", f"/apps/pushed/formations/{failed['id']}").status == 404
    listed = [r["id"] for r in api.ok("GET", "/apps/pushed/releases")]
    assert failed["id"] not in listed
    # the app's own release and artifact are untouched
    assert api.ok("GET", f"/releases/{current['id']}")["artifact"] == current["artifact"]
    assert api("DELETE", f"/apps/pushed/releases/{failed['id']}").status == 404


def test_a_scaled_release_or_a_shared_artifact_stays(api: Api) -> None:
    app = api.ok("POST", "/apps", {"name": "scaled"})
    shared = api.ok("POST", "/artifacts", {"type": "flynn", "uri": "file:///shared.json"})
    one = api.ok("POST", "/releases", {"artifact": shared["id"], "processes": {"web": {}}})
    two = api.ok("POST", "/releases", {"artifact": shared["id"], "processes": {"web": {}}})
    api.ok("PUT", f"/apps/{app['id']}/formations/{one['id']}",
           {"app": app["id"], "release": one["id"], "processes": {"web": 1}})  # fmt: skip
    r = api("DELETE", f"/apps/scaled/releases/{one['id']}")
    assert r.status == 400 and "scale them to 0" in r.json()["message"]
    api.ok("DELETE", f"/apps/scaled/releases/{two['id']}")
    assert api.ok("GET", f"/artifacts/{shared['id']}")["id"] == shared["id"]
