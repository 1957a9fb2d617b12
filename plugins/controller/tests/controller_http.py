"""HTTP helpers for the controller's tests: one synchronous request that returns exactly what
came over the wire (status, headers, raw body), shaped like the 2015 CLI's requests (§1.1:
Basic auth with an empty user and the key as password, `Content-Type: application/json` on
every request), and a stand-in for an *external* resource provider on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flynn_host.dev.controller import KEY, ControllerProcess


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.status} {self.content_type!r} {self.body[:500]!r}"


def auth_header(key: str) -> str:
    return "Basic " + base64.b64encode(f":{key}".encode()).decode()


def request(
    base_url: str,
    method: str,
    path: str,
    body: object = None,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> Response:
    """One request on a fresh connection. `body` may be bytes/str (sent as is) or anything
    JSON-serialisable; `key=None` sends no Authorization header."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        hdrs["Authorization"] = auth_header(key)
    if body is None or isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


class Api:
    """`request` bound to one controller: `api("GET", "/apps")`."""

    def __init__(self, ctl: ControllerProcess) -> None:
        self.ctl = ctl
        self.url = ctl.url
        self.key = ctl.key

    def __call__(self, method: str, path: str, body: object = None, **kw: Any) -> Response:
        kw.setdefault("key", self.key)
        return request(self.url, method, path, body, **kw)

    def ok(self, method: str, path: str, body: object = None, **kw: Any) -> Any:
        """The request must answer exactly 200; returns the decoded JSON body (None if empty)."""
        r = self(method, path, body, **kw)
        assert r.status == 200, f"{method} {path}: {r}\n{self.ctl.log_text()[-2000:]}"
        return r.json() if r.body else None


@dataclass
class FakeProvider:
    """A resource provider on loopback (what the postgres appliance's API is to the real
    controller): `POST …/databases` provisions, `DELETE …/databases?id=` deprovisions.
    Provider URLs are unique in the controller: `new_url()` gives another one to the same
    server."""

    url: str
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"some": "data"})

    def new_url(self) -> str:
        return self.url.replace("/databases", f"/{uuid.uuid4().hex[:8]}/databases")


@contextlib.contextmanager
def fake_provider() -> Iterator[FakeProvider]:
    provider: FakeProvider

    class Handler(BaseHTTPRequestHandler):
        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload: object) -> None:
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            provider.requests.append(("POST", self.path, self._body()))
            if not urllib.parse.urlsplit(self.path).path.endswith("/databases"):
                return self._reply(404, None)
            self._reply(200, {"id": f"/databases/{uuid.uuid4()}", "env": provider.env})

        def do_DELETE(self) -> None:  # noqa: N802
            provider.requests.append(("DELETE", self.path, self._body()))
            self._reply(200, None)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider = FakeProvider(f"http://127.0.0.1:{server.server_address[1]}/databases")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
