"""The bootstrap actions Layer 1 adds — `gen-random` and `wait` — and step data in templates
(`{{ (index .StepData "ID").Data }}`), rendered when the step runs, with secrets kept out of
every output."""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from flynn_host.bootstrap.genrandom import GenRandom
from flynn_host.bootstrap.manifest import parse_manifest
from flynn_host.bootstrap.output import json_logger, text_logger
from flynn_host.bootstrap.runner import Action, ClusterHost, State, StepError, run_steps
from flynn_host.bootstrap.template import TemplateError, render, render_step
from flynn_host.bootstrap.wait import StatusCheck, Wait
from flynn_host.client import HostClient

DATA = {"Singleton": False, "SortedHostIPs": ["10.0.0.1"]}


# --- step data in templates ---------------------------------------------------------------------


def test_step_data_is_left_for_later_then_rendered() -> None:
    src = '[{"id": "a", "action": "x", "pw": "{{ (index .StepData \\"pw\\").Data }}"}]'
    (step,) = parse_manifest(src, "m", DATA)
    assert step["pw"] == '{{ (index .StepData "pw").Data }}'
    rendered = render_step(step, {**DATA, "StepData": {"pw": {"data": "s3cret"}}})
    assert rendered["pw"] == "s3cret" and step["pw"] != "s3cret"


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ('{{ (index .StepData "nope").Data }}', "step 'nope' has no data"),
        ('{{ (index .StepData "pw").Other }}', "has no field Other"),
        ('{{ index .StepData "pw" }}', "unsupported template construct"),
    ],
)
def test_step_data_errors(src: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render(src, {**DATA, "StepData": {"pw": {"data": "x"}}})


# --- gen-random ----------------------------------------------------------------------------------


def state() -> State:
    return State(hosts=[])


@pytest.mark.parametrize(
    ("step", "check"),
    [
        ({}, lambda v: len(v) == 32 and int(v, 16) >= 0),
        ({"length": 24}, lambda v: len(v) == 48),
        ({"length": 30, "encoding": "base64"}, lambda v: len(v) == 40 and "=" not in v),
        ({"encoding": "uuid"}, lambda v: len(v) == 36 and v.count("-") == 4),
        ({"data": "given"}, lambda v: v == "given"),
    ],
)
def test_gen_random_values(step: dict[str, Any], check: Any) -> None:
    s = state()
    value = GenRandom({"id": "r", "action": "gen-random", **step}).run(s)["data"]
    assert check(value) and value in s.secrets
    again = GenRandom({"id": "r", "action": "gen-random", **step}).run(s)["data"]
    assert (again == value) == ("data" in step)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"length": "8"}, "length must be a number"),
        ({"length": 0, "encoding": "hex", "data": ""}, None),
        ({"length": -1}, "between 1 and"),
        ({"length": 10**6}, "between 1 and"),
        ({"encoding": "rot13"}, "encoding 'rot13' is not one of hex, base64, uuid"),
        ({"data": 5}, "data must be a string"),
    ],
)
def test_gen_random_rejects_bad_fields(step: dict[str, Any], message: str | None) -> None:
    if message is None:  # 0 means the default, as in Flynn
        GenRandom({"id": "r", "action": "gen-random", **step})
        return
    with pytest.raises(StepError, match=message):
        GenRandom({"id": "r", "action": "gen-random", **step})


class Record(Action):
    """Returns the step as it reached the action (after rendering)."""

    seen: list[dict[str, Any]] = []

    def run(self, state: State) -> Any:
        Record.seen.append(self.step)
        if self.step.get("fail"):
            raise StepError(f"failed with {self.step['value']}")
        return {"got": self.step["value"]}


@pytest.mark.parametrize("logger", [json_logger, text_logger])
def test_secrets_reach_later_steps_but_no_output(logger: Any) -> None:
    Record.seen.clear()
    out = io.StringIO()
    steps = [
        {"id": "pw", "action": "gen-random"},
        {"id": "use", "action": "record", "value": 'pw={{ (index .StepData "pw").Data }}'},
        {
            "id": "fail",
            "action": "record",
            "fail": True,
            "value": '{{ (index .StepData "pw").Data }}',
        },
    ]
    s = State(hosts=[], emit=logger(out))
    assert not run_steps(steps, {"gen-random": GenRandom, "record": Record}, s)
    (secret,) = s.secrets
    assert [r["value"] for r in Record.seen] == [f"pw={secret}", secret]
    assert s.step_data["use"] == {"got": f"pw={secret}"}  # later steps see the real value
    text = out.getvalue()
    assert secret not in text and "(secret)" in text
    assert "failed with (secret)" in text


# --- wait ----------------------------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """`/ok` 200, `/status/N` N, discoverd's `/services/NAME/(instances|leader)` from `routes`."""

    routes: dict[str, Any] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path in self.routes:
            code, body = 200, json.dumps(self.routes[self.path]).encode()
        elif self.path == "/ok":
            code, body = 200, b"ok"
        elif self.path.startswith("/status/"):
            code, body = int(self.path.rsplit("/", 1)[1]), b"not yet"
        else:
            code, body = 404, b'{"code": "not_found"}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        Handler.routes = {}


class StatusClient(HostClient):
    """A host whose `GET /host/status` reports discoverd at `url` (nothing else is asked)."""

    def __init__(self, url: str) -> None:
        super().__init__("http://127.0.0.1:1", key="")
        self.discoverd = url

    def status(self) -> dict[str, Any]:
        return {"discoverd": {"url": self.discoverd}}


def wait_state(port: int) -> State:
    host = ClusterHost("127.0.0.1:1", StatusClient(f"http://127.0.0.1:{port}"))
    return State(hosts=[host])


def test_wait_http_and_tcp(server: int) -> None:
    s = wait_state(server)
    assert (
        Wait({"id": "w", "action": "wait", "url": f"http://127.0.0.1:{server}/ok"}).run(s) is None
    )
    Wait({"id": "w", "action": "wait", "url": f"tcp://127.0.0.1:{server}"}).run(s)
    step = {"id": "w", "action": "wait", "url": f"http://127.0.0.1:{server}/status/401"}
    Wait({**step, "status": 401}).run(s)
    with pytest.raises(StepError, match="answered 401 \\(want 200\\): not yet"):
        Wait({**step, "timeout": 1}).run(s)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    with pytest.raises(StepError, match=f"timed out after 1s .*127.0.0.1:{closed}"):
        Wait({"id": "w", "action": "wait", "url": f"tcp://127.0.0.1:{closed}", "timeout": 1}).run(s)


def test_wait_resolves_discoverd_names(server: int) -> None:
    s = wait_state(server)
    Handler.routes = {
        "/services/web/instances": [{"addr": "127.0.0.1:1"}, {"addr": f"127.0.0.1:{server}"}],
        "/services/db/leader": {"addr": f"127.0.0.1:{server}"},
    }
    # any instance answering is enough; the instance's own port unless the URL gives one
    Wait({"id": "w", "action": "wait", "url": "http://web.discoverd/ok"}).run(s)
    Wait({"id": "w", "action": "wait", "url": "tcp://leader.db.discoverd"}).run(s)
    Wait({"id": "w", "action": "wait", "url": f"http://leader.db.discoverd:{server}/ok"}).run(s)
    with pytest.raises(StepError, match="discoverd has no leader of service web"):
        Wait(
            {"id": "w", "action": "wait", "url": "http://leader.web.discoverd/", "timeout": 1}
        ).run(s)
    with pytest.raises(StepError, match="discoverd has no service other"):
        Wait({"id": "w", "action": "wait", "url": "http://other.discoverd/", "timeout": 1}).run(s)


def test_status_check_needs_every_service_healthy(server: int) -> None:
    s = wait_state(server)
    Handler.routes = {"/services/web/instances": [{"addr": f"127.0.0.1:{server}"}]}
    checks: dict[str, Any] = {
        "discoverd": {"host_discoverd": "/ok"},
        "web": "http://web.discoverd/ok",
        "routed": {"url": f"http://127.0.0.1:{server}/status/401", "status": 401},
    }
    step = {"id": "status-check", "action": "status-check", "checks": checks}
    assert StatusCheck(step).run(s) == {"healthy": ["discoverd", "routed", "web"]}
    # one unhealthy service fails the step, named with what it answered; the others are not
    checks["db"] = f"http://127.0.0.1:{server}/status/503"
    checks["gone"] = "http://gone.discoverd/"
    with pytest.raises(StepError) as err:
        StatusCheck({**step, "timeout": 1}).run(s)
    assert str(err.value).startswith("unhealthy after 1s: db: ")
    assert "answered 503 (want 200)" in str(err.value)
    assert "gone: discoverd has no service gone" in str(err.value)
    assert "web:" not in str(err.value) and "discoverd:" not in str(err.value)
    # a host whose discoverd does not answer
    with pytest.raises(StepError, match="discoverd: .*/nothing-here: HTTP Error 404"):
        StatusCheck({**step, "checks": {"discoverd": {"host_discoverd": "nothing-here"}},
                     "timeout": 0.5}).run(s)  # fmt: skip
    for bad, message in (({}, "checks must map"), ({"checks": {"x": 3}}, "check 'x': expected"),
                         ({"checks": {"x": "ftp://x/"}}, "check 'x': url 'ftp")):  # fmt: skip
        with pytest.raises(StepError, match=message):
            StatusCheck({"id": "s", **bad})


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({}, "url must be set"),
        ({"url": "ftp://x/"}, "expected http://, https:// or tcp://"),
        ({"url": "tcp://example"}, "a tcp URL needs a port"),
        ({"url": "http://x/", "status": "200"}, "status must be an HTTP status code"),
    ],
)
def test_wait_rejects_bad_fields(step: dict[str, Any], message: str) -> None:
    with pytest.raises(StepError, match=message):
        Wait({"id": "w", "action": "wait", **step})


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers Flynn's 500 `retry: true` twice, then 200; `/never` always answers `retry:
    false`."""

    calls: dict[str, int] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        n = Flaky.calls[self.path] = Flaky.calls.get(self.path, 0) + 1
        retry = self.path != "/never"
        if n <= 2 or not retry:
            code = 500
            body = {"code": "unknown_error", "message": f"try {n}", "retry": retry}
        else:
            code, body = 200, {"ok": n}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_request_answered_retry_true_is_made_again() -> None:
    from flynn_host.bootstrap import services

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        resp = services.request(State(hosts=[]), "POST", base + "/flaky", {}, retry_for=30)
        assert (resp.status, resp.body, Flaky.calls["/flaky"]) == (200, {"ok": 3}, 3)
        # `retry: false` is an answer: returned at once
        resp = services.request(State(hosts=[]), "POST", base + "/never", {}, retry_for=30)
        assert (resp.status, Flaky.calls["/never"]) == (500, 1)
        # out of time: the last answer
        Flaky.calls.clear()
        resp = services.request(State(hosts=[]), "POST", base + "/flaky", {}, retry_for=0)
        assert (resp.status, resp.body["message"]) == (500, "try 1")
    finally:
        srv.shutdown()
        srv.server_close()
