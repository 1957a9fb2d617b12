"""The controller against Flynn's own recording of its 2015 API: every request of
`docs/api-examples/controller.json` this issue covers is replayed, in the order Flynn's example
generator made them, on a real controller process; the ids in URLs and bodies are rewritten from
the recorded ones to the ones our controller handed out (learnt as the responses come back).

Each response must be exactly 200, its body must validate against the 2015 schema the example's
own schema names (`schema/examples/controller/<name>.json`; see `flynn2015`), and what the
recorded response said about the objects the replay made (names, env, process defaults, ...)
must be said again; timestamps and fields the recording lacks are not compared.

Left out (recorded, but not this issue's):
* `job_run`, `job_delete`: running and stopping jobs come with the scheduler (issue 13), and
  `job_list` lists the job `job_run` made (`job_update`, the scheduler's report, is replayed);
* `app_log`: it needs a log aggregator; `test_app_log.py` replays it against one.

The recorded provider URL points nowhere; the provider is registered with the URL of a small
provider on loopback (`controller_http.fake_provider`), a test double of an *external* service.
Before the replay, the app `gitreceive` is made with its recorded release (the generator read
it from a booted cluster's system app) so that `app_initial_release_get` has something to get.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from controller_http import Api, FakeProvider
from flynn2015 import examples, response_validator, schema_errors, type_validator
from sse_client import SSEStream

NOT_THIS_ISSUE = {"job_run", "job_list", "job_delete", "app_log"}
REPLAYED = [name for name in examples() if name not in NOT_THIS_ISSUE]

ID_FIELDS = ("id", "app", "release", "artifact", "provider", "old_release", "new_release")
TIMESTAMPS = {"created_at", "updated_at", "finished_at"}
GITRECEIVE_URI = (
    "https://dl.flynn.io/tuf?name=flynn/gitreceive"
    "&id=99961c865ed4d3a2b2639e61d03af191020e4017fa9ffb1aad478285dcb0dfd5"
)


@dataclass
class Replay:
    api: Api
    provider: FakeProvider
    ids: dict[str, str] = field(default_factory=dict)  # recorded id → ours
    event_ids: dict[int, int] = field(default_factory=dict)
    responses: dict[str, Any] = field(default_factory=dict)  # name → our decoded body

    def rewrite(self, text: str) -> str:
        for recorded, ours in self.ids.items():
            text = text.replace(recorded, ours)
        return re.sub(
            r"^/events/(\d+)$",
            lambda m: f"/events/{self.event_ids.get(int(m[1]), int(m[1]))}",
            text,
        )

    def learn(self, recorded: Any, ours: Any) -> None:
        """Map the ids of a recorded object to those of ours (first sighting wins)."""
        if not (isinstance(recorded, dict) and isinstance(ours, dict)):
            return
        for key in ID_FIELDS:
            r, o = recorded.get(key), ours.get(key)
            if isinstance(r, str) and isinstance(o, str) and r not in self.ids:
                self.ids[r] = o


@pytest.fixture(scope="module")
def replay(api: Api, provider: FakeProvider) -> Replay:
    rp = Replay(api, provider)
    rp.ids["http://example-provider-1449854305880417681.discoverd:12345/providers/"
           "1449854305880417681"] = provider.url  # fmt: skip
    # the system app gitreceive, as the recording found it (its release keeps its id)
    recorded_release = json.loads(examples()["app_initial_release_get"]["response"]["body"])
    api.ok("POST", "/apps", {"name": "gitreceive", "meta": {"flynn-system-app": "true"}})
    artifact = api.ok("POST", "/artifacts", {"type": "docker", "uri": GITRECEIVE_URI})
    rp.ids[recorded_release["artifact"]] = artifact["id"]
    body = {k: v for k, v in recorded_release.items() if k != "created_at"}
    body["artifact"] = artifact["id"]
    api.ok("POST", "/releases", body)
    api.ok("PUT", "/apps/gitreceive/release", {"id": recorded_release["id"]})
    return rp


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMESTAMPS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _differences(recorded: Any, ours: Any, path: str = "$") -> list[str]:
    """What the recorded value says that ours does not (extra fields of ours are the
    schema's business)."""
    if isinstance(recorded, dict) and isinstance(ours, dict):
        out = []
        for k, v in recorded.items():
            if k not in ours:
                out.append(f"{path}.{k}: missing (recorded {v!r})")
            else:
                out += _differences(v, ours[k], f"{path}.{k}")
        return out
    return [] if recorded == ours else [f"{path}: {ours!r}, recorded {recorded!r}"]


def _key(obj: dict[str, Any]) -> Any:
    return obj.get("id") or (obj.get("app"), obj.get("release"))


def _compare(rp: Replay, name: str, recorded_body: str, ours: Any) -> list[str]:
    """The recorded response (ids rewritten) against ours. Lists: every recorded element
    about an object this replay made must be in ours (the recording's other elements are
    the system apps of a booted cluster)."""
    if name in ("events_list", "event_get"):  # other events: the recording had jobs
        return []
    recorded = _strip(json.loads(rp.rewrite(recorded_body)))
    ours = _strip(ours)
    if not isinstance(recorded, list):
        return _differences(recorded, ours)
    made = set(rp.ids.values())
    ours_by_key = {json.dumps(_key(o)): o for o in ours if isinstance(o, dict)}
    out = []
    for i, element in enumerate(recorded):
        key = _key(element)
        if not (set(key if isinstance(key, tuple) else [key]) & made):
            continue
        mine = ours_by_key.get(json.dumps(key))
        if mine is None:
            out.append(f"$[{i}] {key}: missing from our list")
        else:
            out += _differences(element, mine, f"$[{key}]")
    return out


def _replay_stream(rp: Replay, path: str, last_event_id: str) -> None:
    with SSEStream(rp.api.url, path, key=rp.api.key, last_event_id=int(last_event_id)) as s:
        s.open(timeout=5)
        assert s.status == 200, f"GET {path}: {s.status} {s.headers}"
        assert s.headers.get("content-type") == "text/event-stream; charset=utf-8"
        events = s.read_items(count=10, timeout=3)
    listed = rp.responses["events_list"]
    assert events, "no past events streamed"
    # past=true, count=10: the newest 10 stored events, oldest first
    assert [e.data["id"] for e in events] == sorted(e["id"] for e in listed)
    for e in events:
        assert not schema_errors(type_validator("event"), e.data), schema_errors(
            type_validator("event"), e.data
        )


def _wait_for_formation(rp: Replay, path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (r := rp.api("GET", path)).status != 200:
        assert time.monotonic() < deadline, f"the deployment made no formation: GET {path}: {r}"
        time.sleep(0.1)


@pytest.mark.parametrize("name", list(examples()))
def test_recorded_responses_validate(name: str) -> None:
    """The harness itself: Flynn's recorded responses validate against the schemas their
    examples name, so a failure of ours is ours, not the registry's."""
    body = examples()[name]["response"].get("body")
    if name == "events_stream":
        instances = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: ")]
        validator = type_validator("event")
        assert len(instances) == body.count("\n\n")
    else:
        validator = response_validator(name)
        instances = [json.loads(body)] if body else []
        if validator is None:
            assert not instances, f"{name} has a body but no schema"
            return
    for instance in instances:
        assert not schema_errors(validator, instance), schema_errors(validator, instance)


@pytest.mark.parametrize("name", REPLAYED)
def test_recorded_request(replay: Replay, name: str) -> None:
    example = examples()[name]
    req, recorded = example["request"], example["response"]
    path = replay.rewrite(req["url"])
    if name == "events_stream":
        return _replay_stream(replay, path, req["headers"].get("Last-Event-Id", "0"))
    if name == "formation_delete":
        # the formation is the deployment's, made by its task after POST /deploy answered (the
        # recording's generator raced it and ignored errors; there is no scale event of it)
        _wait_for_formation(replay, path)
    body = replay.rewrite(req["body"]) if "body" in req else None
    headers = {k: v for k, v in req["headers"].items() if k in ("Accept",)}
    r = replay.api(req["method"], path, body, headers=headers)
    where = f"{req['method']} {path} {body or ''}"

    if name == "app_create_error":
        assert r.status == 400, f"{where}: {r}"
        assert r.content_type and r.content_type.startswith("application/json"), str(r)
        err = r.json()
        assert not schema_errors(response_validator(name), err), schema_errors(
            response_validator(name), err
        )
        assert err["code"] == "validation_error" and err["detail"] == {"field": "name"}, err
        assert err["retry"] is False, err
        return

    assert r.status == 200, f"{where}: {r}"
    recorded_body = recorded.get("body")
    ours = r.json() if r.body else None
    replay.responses[name] = ours
    validator = response_validator(name)
    if validator is not None and (recorded_body is not None or ours is not None):
        assert ours is not None, f"{where}: empty body, a {name} response was expected"
        assert r.content_type and r.content_type.startswith("application/json"), str(r)
        errors = schema_errors(validator, ours)
        assert not errors, f"{where}: against the 2015 schema:\n" + "\n".join(errors)
    if recorded_body is not None:
        replay.learn(json.loads(recorded_body), ours)
        if name == "events_list":
            replay.event_ids[json.loads(recorded_body)[0]["id"]] = ours[0]["id"]
        differences = _compare(replay, name, recorded_body, ours)
        assert not differences, f"{where}: unlike the recording:\n" + "\n".join(differences)

    if name == "route_list":  # the default route made with the app (§7 POST /apps)
        app = json.loads(examples()["app_create"]["request"]["body"])["name"]
        assert any(
            rt.get("domain") == f"{app}.dev.localflynn.test" and rt.get("service") == f"{app}-web"
            for rt in ours
        ), f"no default route for {app}: {ours}"
    if name == "event_get":
        assert ours == replay.responses["events_list"][0]
    if name == "provider_resource_create":
        assert [m for m, *_ in replay.provider.requests] == ["POST"], replay.provider.requests
