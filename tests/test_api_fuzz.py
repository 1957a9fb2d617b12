"""Fuzzing the host API (issue 9): hypothesis sends random and hostile requests to every route
of `api.make_app` on one real daemon — JSON of any shape, near-valid bodies with one field made
hostile (`true` for integers, NUL bytes, huge numbers, paths out of the image directories),
deep nesting, invalid UTF-8, bodies over the cap, random paths, methods and headers (an event
stream, an upgrade). Every answer must come within a timeout and be below 500, errors in Flynn's
JSON; the daemon's memory stays bounded; and afterwards it still stops on SIGTERM in time.

Nothing it sends may reach beyond loopback or change the host: an http(s) URL other than
`http://127.0.0.1:1/` (where nothing listens) is never sent, a job network the host would accept
is never sent (it would make a bridge and a NAT rule), and a job that could start runs only
`true` from the busybox image (with layers of at most 64 MiB). Figures of a run on 2 shared
cores: 3000 requests in about 30 s, the daemon's RSS at most ~76 MB (51 MB idle; the bound is
200 MB), stopped by SIGTERM in under a second.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import time
import types
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flynn_host import api, limits
from flynn_host.errors import ValidationError
from flynn_host.networking.jobnet import parse_network

from .conftest import IMAGES, busybox_job, mounts_under, needs_root, rss_bytes

pytestmark = needs_root

EXAMPLES = 3000
REQUEST_TIMEOUT = 10.0  # seconds for the answer's status and headers (and a body's end)
MAX_RSS = 200 * 1024 * 1024
STOP_TIMEOUT = 3.0  # devhost's --stop-timeout
STOP_GRACE = 5.0  # beyond it, for the daemon's own shutdown
# the only http(s) URL the fuzzer may send: loopback, a port where nothing listens
SAFE_URL = "http://127.0.0.1:1/"


def routes() -> list[tuple[str, str]]:
    """Every (method, path template) `make_app` serves, read from its router so that a route
    added later is fuzzed too."""

    class NoPlugins:
        config = types.SimpleNamespace(host_key="k" * 16)

        def plugin_apps(self) -> list[Any]:
            return []

    app = api.make_app(NoPlugins())  # type: ignore[arg-type]
    found = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    return sorted((m, p) for m, p in found if m != "HEAD")  # HEAD is GET's shadow


ROUTES = routes()

# --- strategies -------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", " ", "\0", "a\0b", "\n", "x\n", "..", "../../etc/shadow", "/dev/zero", "/etc/shadow",
    "file:///dev/zero", "file:///etc/shadow", f"file://{IMAGES}/busybox/manifest.json",
    f"file://{IMAGES}/../../etc/passwd", SAFE_URL, "x" * 70_000, "\ud800", "é", "CAP_SYS_ADMIN",
    "true", "-1", "1e309", "default", "TERM", "KILL", "0.0.0.0/0", "127.0.0.0/8",
]  # fmt: skip
HOSTILE_NUMBERS = [True, False, -1, 0, 1, 2, 64, 65535, 65536, 2**31, 2**32, 2**63, 10**30,
                   -(2**63), 1.5, float("inf"), float("nan")]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(HOSTILE_STRINGS)
    | st.sampled_from(HOSTILE_NUMBERS)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["id", "args", "url"]), inner,
                      max_size=4),
    max_leaves=12,
)  # fmt: skip


def templates(job_id: str) -> dict[str, Any]:
    """A valid body per route (by path template): what the fuzzer spoils fields of."""
    job = busybox_job(job_id, ["true"])
    return {
        "/host/jobs/{id}": job,
        "/attach": {"job_id": job_id, "flags": 9, "lines": 10, "height": 24, "width": 80},
        "/host/resource-check": {"ports": [{"port": 0, "proto": "tcp"}]},
        "/host/discoverd": {"url": SAFE_URL, "job_id": "d", "dns": "127.0.0.1:53"},
        "/host/network": {"job_id": "f", "subnet": "100.100.3.0/24", "mtu": 1500},
        "/host/images": {"manifest_url": str(IMAGES / "busybox" / "manifest.json"), "name": "bb"},
        "/storage/providers/{provider}/volumes": {"id": "v1", "meta": {"a": "b"}},
    }


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def spoiled(draw: st.DrawFn, template: Any) -> Any:
    """`template` with one to three fields replaced by hostile values, or deleted."""
    body = json.loads(json.dumps(template))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(body)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        target = body
        for key in parents:
            target = target[key]
        if draw(st.integers(0, 5)) == 0:
            del target[last]
        else:
            target[last] = draw(json_values)
    return body


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def bodies(draw: st.DrawFn, template: Any | None) -> bytes | None:
    kind = draw(st.sampled_from(["none", "json", "valid", "spoiled", "spoiled", "spoiled",
                                 "binary", "deep", "big", "utf8", "truncated"]))  # fmt: skip
    if kind == "valid" and template is not None:
        return encode(template)
    if kind == "spoiled" and template is not None:
        return encode(draw(spoiled(template)))
    if kind == "none":
        return None
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 1000, 100_000]))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'[{"b":']))
        return opener * depth
    if kind == "big":  # around the body cap; built, not drawn, to stay fast
        size = draw(st.sampled_from([limits.MAX_JSON_BODY - 2, limits.MAX_JSON_BODY + 1, 3 << 20]))
        return b'"' + b"a" * size + b'"'
    if kind == "utf8":
        return b'{"id": "\xff\xfe", "url": "\xc3\x28", "args": ["\xed\xa0\x80"]}'
    text = encode(draw(json_values))
    if kind == "truncated":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text


@st.composite
def requests(draw: st.DrawFn, job_ids: list[str]) -> dict[str, Any]:
    """One request: a route of make_app (most often) or a random path and method."""
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                                       "HEAD", "FOO"]))  # fmt: skip
        path = "/" + quote(draw(st.text(max_size=30)), safe="/")
        template = None
    else:
        method, path = draw(st.sampled_from(ROUTES))
        template = templates(draw(st.sampled_from(job_ids)) if job_ids else "j")
        template = template.get(path) if method in ("PUT", "POST") else None
        params = {
            "id": st.sampled_from(job_ids or ["j"]) | st.sampled_from(HOSTILE_STRINGS[:12])
            | st.text(min_size=1, max_size=20),
            "signal": st.sampled_from(["TERM", "9", "0", "99", "SIGKILL", "x", "-1", "1e3"])
            | st.text(min_size=1, max_size=8),
            "provider": st.sampled_from(["default", "nope"]),
            "name": st.sampled_from(["busybox", "bb", ".."]) | st.text(min_size=1, max_size=20),
        }  # fmt: skip
        for name, strategy in params.items():
            if "{" + name + "}" in path:
                value = draw(strategy)
                if name == "id" and template is not None and "mountspecs" in template:
                    template = {**template, "id": value}  # the URL's id is the job's
                path = path.replace("{" + name + "}", quote(value, safe=""))
    headers = {}
    if draw(st.booleans()):
        headers["Accept"] = draw(st.sampled_from(["text/event-stream", "*/*", "application/json"]))
    if draw(st.integers(0, 4)) == 0:
        headers.update({"Upgrade": "flynn-attach/0", "Connection": "Upgrade"})
    if draw(st.booleans()):
        types = ["application/json", "text/plain", "", "multipart/form-data; boundary=x"]
        headers["Content-Type"] = draw(st.sampled_from(types))
    body = draw(bodies(template))
    return {"method": method, "path": path, "headers": headers, "body": body,
            "chunked": body is not None and draw(st.integers(0, 5)) == 0}  # fmt: skip


# --- what may be sent -------------------------------------------------------------------------

_URL = re.compile(rb"(?i)(https?):(//|\\/\\/)")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def harmless(req: dict[str, Any]) -> bool:
    """Whether sending `req` stays on loopback and leaves the host as it was."""
    body = req["body"] or b""
    texts = [body, req["path"].encode()]
    try:
        parsed = limits.loads_json(body) if body else None  # json.loads would recurse
    except ValueError:
        parsed = None  # the daemon refuses it as well
    texts += [s.encode(errors="surrogatepass") for s in _strings(parsed)]
    for text in texts:  # any http(s) URL must be the one where nothing listens
        for m in _URL.finditer(text):
            if not text[m.end() :].startswith(b"127.0.0.1:1/"):
                return False
    if req["path"] == "/host/network":
        try:
            parse_network(parsed)
            return False  # the host would make a bridge from it
        except ValidationError:
            pass
    specs = parsed.get("mountspecs") if isinstance(parsed, dict) else None
    for spec in specs if isinstance(specs, list) else []:
        # should the file:// rule ever fail, a layer from /dev/zero must not fill the disk
        size = spec.get("size") if isinstance(spec, dict) else None
        if isinstance(size, int) and size > 64 * limits.MIB:
            return False
    config = (parsed.get("config") if isinstance(parsed, dict) else None) or {}
    args = config.get("args") if isinstance(config, dict) else None
    if isinstance(args, list) and args and all(isinstance(a, str) for a in args):
        return args[0] == "true"  # a job that may start runs nothing but `true`
    return True


def send(port: int, auth: dict[str, str], req: dict[str, Any]) -> tuple[int, bytes, str] | None:
    """Send `req`; return status, body and content type, or None if the daemon closed the
    connection without an answer. An event stream or an upgrade is closed after its headers.
    A hang raises TimeoutError."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        body = req["body"]
        if req["chunked"]:
            body = iter([body[i : i + 4096] for i in range(0, len(body), 4096)] or [b""])
        try:
            conn.request(req["method"], req["path"], body=body, encode_chunked=req["chunked"],
                         headers={**auth, **req["headers"]})  # fmt: skip
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the whole body was sent: read that answer
        try:
            resp = conn.getresponse()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            return None
        ctype = resp.getheader("Content-Type", "")
        streaming = resp.status == 101 or "event-stream" in ctype
        return resp.status, b"" if streaming else resp.read(), ctype
    finally:
        conn.close()


def test_fuzz_every_route_of_the_host_api(daemon, capsys):
    assert daemon.proc is not None
    pid = daemon.proc.pid
    job_ids = [daemon.new_job_id() for _ in range(3)]
    seen = {"examples": 0, "max_rss": rss_bytes(pid), "statuses": {}}

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=2 * REQUEST_TIMEOUT),
              database=None, suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(req=requests(job_ids))
    def one(req: dict[str, Any]) -> None:
        assume(harmless(req))
        try:
            answer = send(daemon.port, daemon.auth_headers, req)
        except TimeoutError:
            pytest.fail(f"no answer in {REQUEST_TIMEOUT} s to {req['method']} {req['path']}")
        if answer is None:
            # a refusal before the whole request was read (a body over the cap, a method the
            # HTTP parser refuses) may reach the client as a reset; nothing else may
            big = len(req["body"] or b"") > limits.MAX_JSON_BODY
            assert big or req["method"] == "FOO", f"connection dropped: {req!r:.300}"
            seen["examples"] += 1
            return
        status, body, ctype = answer
        seen["examples"] += 1
        seen["statuses"][status] = seen["statuses"].get(status, 0) + 1
        assert status < 500, (status, body[:500], daemon.log()[-1500:])
        if req["method"] == "FOO":  # aiohttp's parser refuses it before the app sees it
            assert status == 400
        elif status >= 400 and req["method"] != "HEAD":
            error = json.loads(body)  # Flynn's error JSON, never a bare error page
            assert "json" in ctype and {"code", "message"} <= error.keys(), body[:500]
        seen["max_rss"] = max(seen["max_rss"], rss_bytes(pid))
        assert seen["max_rss"] < MAX_RSS, f"daemon RSS {seen['max_rss'] >> 20} MB"

    started = time.monotonic()
    one()
    took = time.monotonic() - started
    assert daemon.proc.poll() is None, daemon.log()

    # stops on SIGTERM within its stop timeout, leaving no mount behind
    stopping = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        code = daemon.proc.wait(STOP_TIMEOUT + STOP_GRACE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon did not stop within {STOP_TIMEOUT + STOP_GRACE} s of SIGTERM")
    stop = time.monotonic() - stopping
    assert code == 0, daemon.log()
    assert mounts_under(daemon.base) == []
    with capsys.disabled():
        print(f"\nfuzz: {seen['examples']} requests in {took:.1f} s, statuses "
              f"{dict(sorted(seen['statuses'].items()))}, max RSS "
              f"{seen['max_rss'] / 2**20:.0f} MB, stopped in {stop:.1f} s")  # fmt: skip
