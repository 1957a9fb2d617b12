"""Stand-ins for unit tests of bootstrap actions: a host whose jobs run at once (its API in
memory) and one HTTP server on loopback playing discoverd's API and the services it names."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flynn_host.bootstrap.runner import ClusterHost, State
from flynn_host.client import HostAPIError, HostClient

IMAGE_SOURCE = "file:///var/lib/flynn/images/components/manifest.json"


class FakeHost(HostClient):
    """A host API in memory: jobs are `running` as soon as they are added; images `components`
    and `busybox` exist; `GET /host/status` reports discoverd at `discoverd_url`."""

    def __init__(self, discoverd_url: str = "") -> None:
        super().__init__("http://127.0.0.1:1", key="")
        self.discoverd_url = discoverd_url
        self.jobs: dict[str, dict[str, Any]] = {}

    def status(self) -> dict[str, Any]:
        return {"id": "h1", "discoverd": {"url": self.discoverd_url}}

    def add_job(self, job: dict[str, Any]) -> None:
        self.jobs[job["id"]] = {"job": job, "status": "running"}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        if path == "/host/jobs?active=true":
            return {i: j for i, j in self.jobs.items() if j["status"] == "running"}
        if path.startswith("/host/jobs/"):
            return self.jobs[path.rsplit("/", 1)[1]]
        if path.startswith("/host/images/"):
            name = path.rsplit("/", 1)[1]
            if name not in ("components", "busybox"):
                raise HostAPIError(404, {"code": "not_found", "message": "no image"})
            source = IMAGE_SOURCE.replace("components", name)
            return {"name": name, "id": f"{name}-id", "source": source, "mountspecs": []}
        if path == "/storage/providers/default/volumes":
            return {"id": "vol1"}
        raise AssertionError(f"unexpected host call {method} {path}")


Handler = Callable[[str, str, dict[str, str], Any], tuple[int, Any]]


class Services:
    """One loopback HTTP server: discoverd's `/services/NAME/instances` (every service at this
    server's address) and, for anything else, `handle(method, path, headers, body)`."""

    def __init__(self, handle: Handler, known: tuple[str, ...]) -> None:
        self.handle, self.known = handle, known
        self.calls: list[tuple[str, str, Any]] = []
        services = self

        class H(http.server.BaseHTTPRequestHandler):
            def _do(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(size) if size else b""
                body = json.loads(raw) if raw else None
                path = self.path
                if path.startswith("/services/"):
                    name = path.split("/")[2]
                    if name in services.known:
                        addr = f"127.0.0.1:{services.port}"
                        code, out = 200, [{"addr": addr}]
                    else:
                        code, out = 404, {"code": "not_found"}
                else:
                    services.calls.append((self.command, path, body))
                    code, out = services.handle(self.command, path, dict(self.headers), body)
                data = b"" if out is None else json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _do  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"


@contextmanager
def services(handle: Handler, known: tuple[str, ...] = ()) -> Iterator[Services]:
    s = Services(handle, known)
    thread = threading.Thread(target=s.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()


def host_state(discoverd_url: str = "", **kw: Any) -> tuple[State, FakeHost]:
    client = FakeHost(discoverd_url)
    host = ClusterHost("127.0.0.1:1", client, status=client.status())
    return State(hosts=[host], **kw), client
