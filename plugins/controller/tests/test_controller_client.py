"""The controller client's transport, against a small HTTP(S) server in the test that answers
with canned statuses and bodies: auth and headers, the status → error mapping, retries,
redirects, the TLS pin, the SSE parser and resuming event streams, and the deploy and delete
waits built on them. (End-to-end behaviour against the real controller is in cli/tests.)"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flynn_controller import client as client_module
from flynn_controller.client import (
    APIError,
    Client,
    ControllerError,
    DeploymentFailed,
    NotFound,
    PinMismatch,
    SSEError,
    SSEMessage,
    SSEParser,
    UnexpectedStatus,
    cert_pin,
)

# --------------------------------------------------------------------------------------------
# a canned server


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[["_Handler", Seen], None]


@dataclass
class Canned:
    url: str
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def on(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler


class _Handler(http.server.BaseHTTPRequestHandler):
    canned: Canned

    def log_message(self, *args: object) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = Seen(self.command, self.path, dict(self.headers.items()), body)
        self.canned.seen.append(seen)
        handler = self.canned.routes.get((self.command, self.path.split("?")[0]))
        if handler is None:
            self.send_response(599)
            self.end_headers()
            return
        handler(self, seen)

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def reply(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def json(self, status: int, value: Any) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json")

    def sse(self, chunks: list[bytes], hold: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.end_headers()
        self.wfile.flush()
        for chunk in chunks:
            self.wfile.write(chunk)
            self.wfile.flush()
        if hold:
            time.sleep(hold)


def _serve(context: ssl.SSLContext | None = None) -> Iterator[Canned]:
    handler = type("H", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    canned = Canned(f"{scheme}://127.0.0.1:{server.server_address[1]}")
    handler.canned = canned  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield canned
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def srv() -> Iterator[Canned]:
    yield from _serve()


def event(i: int, data: Any, typ: str = "deployment") -> bytes:
    body = {"id": i, "object_type": typ, "data": data}
    return f"data: {json.dumps(body)}\n\n".encode()


# --------------------------------------------------------------------------------------------
# requests and the status → error mapping


def test_every_request_has_basic_auth_with_an_empty_user_and_a_json_content_type(srv):
    srv.on("GET", "/apps", lambda h, s: h.json(200, []))
    srv.on("POST", "/apps", lambda h, s: h.json(200, {"id": "1", "name": "x", "meta": {}}))
    c = Client(srv.url, "sekrit")
    assert c.app_list() == []
    assert c.create_app({"name": "x", "meta": None})["name"] == "x"
    get, post = srv.seen
    want = "Basic " + base64.b64encode(b":sekrit").decode()
    for seen in (get, post):
        assert seen.headers["Authorization"] == want
        assert seen.headers["Content-Type"] == "application/json"
        assert "Accept" not in seen.headers
    assert get.body == b""
    assert json.loads(post.body) == {"name": "x", "meta": None}


def test_statuses_map_to_errors_as_in_the_go_client(srv):
    srv.on("GET", "/created", lambda h, s: h.json(201, {"id": "x"}))
    srv.on("GET", "/bare404", lambda h, s: h.reply(404))
    srv.on("GET", "/json404", lambda h, s: h.json(404, {"code": "not_found", "message": "nope"}))
    srv.on("GET", "/401", lambda h, s: h.reply(401, b"unauthorized\n", "text/plain"))
    conflict = {"code": "object_exists", "message": 'application "foo" already exists'}
    srv.on("POST", "/apps", lambda h, s: h.json(409, conflict))
    srv.on("DELETE", "/empty", lambda h, s: h.reply(200))
    c = Client(srv.url, "k")
    with pytest.raises(UnexpectedStatus) as e:
        c.get("/created")
    assert str(e.value) == f"GET {srv.url}/created: unexpected status 201"
    with pytest.raises(NotFound) as nf:
        c.get("/bare404")
    assert str(nf.value) == "controller: resource not found"
    with pytest.raises(APIError) as api:
        c.get("/json404")
    assert not isinstance(api.value, NotFound) and api.value.status == 404
    with pytest.raises(UnexpectedStatus, match="unexpected status 401"):
        c.get("/401")
    with pytest.raises(APIError) as api:
        c.create_app({"name": "foo", "meta": None})
    assert str(api.value) == 'object_exists: application "foo" already exists'
    assert (api.value.code, api.value.status, api.value.retry) == ("object_exists", 409, False)
    assert c.delete("/empty") is None


def test_validation_errors_keep_their_detail(srv):
    err = {
        "code": "validation_error",
        "message": "uri is invalid",
        "detail": {"field": "uri"},
        "retry": False,
    }
    srv.on("POST", "/artifacts", lambda h, s: h.json(400, err))
    with pytest.raises(APIError) as e:
        Client(srv.url).create_artifact({"type": "docker", "uri": "::"})
    assert e.value.detail == {"field": "uri"} and e.value.status == 400


def test_retryable_errors_are_retried_until_they_pass(srv):
    answers = [500, 500, 200]

    def flaky(h, s):
        status = answers.pop(0)
        if status == 200:
            h.json(200, {"id": "a"})
        else:
            h.json(500, {"code": "unknown_error", "message": "Something went wrong", "retry": True})

    srv.on("GET", "/apps/a", flaky)
    assert Client(srv.url).get_app("a") == {"id": "a"}
    assert len(srv.seen) == 3


def test_retrying_gives_up(srv, monkeypatch):
    monkeypatch.setattr(client_module, "RETRY_FOR", 0.5)
    srv.on(
        "GET",
        "/apps/a",
        lambda h, s: h.json(500, {"code": "unknown_error", "message": "down", "retry": True}),
    )
    start = time.monotonic()
    with pytest.raises(APIError, match="unknown_error: down"):
        Client(srv.url).get_app("a")
    assert 0.4 < time.monotonic() - start < 3
    assert len(srv.seen) > 2


def test_307_is_followed(srv):
    def moved(h, s):
        h.send_response(307)
        h.send_header("Location", "/apps-elsewhere")
        h.send_header("Content-Length", "0")
        h.end_headers()

    srv.on("POST", "/apps", moved)
    srv.on("POST", "/apps-elsewhere", lambda h, s: h.json(200, {"name": "b"}))
    assert Client(srv.url, "k").create_app({"name": "b", "meta": None}) == {"name": "b"}
    assert [s.path for s in srv.seen] == ["/apps", "/apps-elsewhere"]
    assert json.loads(srv.seen[1].body) == {"name": "b", "meta": None}


def test_connection_errors_name_the_request():
    c = Client("http://127.0.0.1:9", "k")
    with pytest.raises(ControllerError, match=r"^GET http://127.0.0.1:9/apps: connection refused"):
        c.app_list()


def test_paths_are_escaped_and_route_ids_keep_their_slash(srv):
    srv.on("GET", "/apps/a%2Fb", lambda h, s: h.json(200, {"id": "x"}))
    srv.on("GET", "/apps/web/routes/http/1234", lambda h, s: h.json(200, {"type": "http"}))
    c = Client(srv.url)
    assert c.get_app("a/b") == {"id": "x"}
    assert c.get_route("web", "http/1234") == {"type": "http"}


# --------------------------------------------------------------------------------------------
# TLS


@dataclass
class Certs:
    ca_pem: Path
    pin: str
    context: ssl.SSLContext


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """A CA and a leaf for `controller.example.test` and 127.0.0.1, as the bootstrap makes."""
    d = tmp_path_factory.mktemp("certs")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Flynn Test CA"))
        .issuer_name(_name("Flynn Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("controller.example.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("controller.example.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "leaf.pem", d / "leaf.key")
    return Certs(d / "ca.pem", cert_pin(leaf.public_bytes(serialization.Encoding.DER)), ctx)


@pytest.fixture
def tls_srv(certs) -> Iterator[Canned]:
    yield from _serve(certs.context)


def test_the_pin_is_base64_of_the_sha256_of_the_der_certificate():
    # the pin the Go bootstrap prints is 44 characters of padded standard base64
    pin = cert_pin(b"not really a certificate")
    assert len(pin) == 44 and pin.endswith("=")
    assert (
        base64.b64decode(pin) == __import__("hashlib").sha256(b"not really a certificate").digest()
    )


def test_a_matching_pin_replaces_certificate_verification(tls_srv, certs):
    tls_srv.on("GET", "/ca-cert", lambda h, s: h.reply(200, b"PEM", "application/x-x509-ca-cert"))
    # a host name the certificate does not name, and a CA nobody trusts: the pin is enough
    url = tls_srv.url.replace("127.0.0.1", "localhost")
    assert Client(url, "k", pin=certs.pin).ca_cert() == b"PEM"


def test_a_wrong_pin_fails_before_anything_is_sent(tls_srv):
    wrong = cert_pin(b"another certificate")
    with pytest.raises(PinMismatch) as e:
        Client(tls_srv.url, "k", pin=wrong).ca_cert()
    assert str(e.value) == "pinned: the peer leaf certificate did not match the provided pin"
    assert tls_srv.seen == []


def test_without_a_pin_the_certificate_is_verified(tls_srv, certs):
    tls_srv.on("GET", "/apps", lambda h, s: h.json(200, []))
    with pytest.raises(ControllerError, match="x509|certificate"):
        Client(tls_srv.url, "k").app_list()
    assert Client(tls_srv.url, "k", ca_file=str(certs.ca_pem)).app_list() == []


def test_a_pin_that_is_not_base64_is_refused():
    with pytest.raises(ValueError):
        Client("https://controller.example.test", "k", pin="not base64!")


# --------------------------------------------------------------------------------------------
# Server-Sent Events


def _lines(raw: bytes) -> list[bytes]:
    return raw.splitlines(keepends=True)


def test_sse_parser_reads_data_lines_until_a_blank_line():
    raw = b'data: {"a":\ndata: 1}\n\n:\nid: 7\ndata: {"b":2}\n\n'
    msgs = list(SSEParser().parse(_lines(raw)))
    assert msgs == [SSEMessage('{"a":1}'), SSEMessage('{"b":2}')]


def test_sse_parser_marks_error_events():
    raw = b"event: error\ndata: stream buffer overflow\n\n"
    (msg,) = SSEParser().parse(_lines(raw))
    assert msg == SSEMessage("stream buffer overflow", error=True)
    with pytest.raises(SSEError, match="^Server error: stream buffer overflow$"):
        client_module.decode_message(msg)


def test_sse_parser_needs_a_bare_newline_to_end_a_message():
    # as in Go: a CRLF blank line is not a terminator, and `data:` needs its space
    assert list(SSEParser().parse(_lines(b"data: {}\r\n\r\n"))) == []
    assert list(SSEParser().parse(_lines(b"data:{}\n\n"))) == [SSEMessage("")]
    with pytest.raises(SSEError):
        client_module.decode_message(SSEMessage(""))


def test_keepalive_comments_are_not_events():
    assert list(SSEParser().parse(_lines(b":\n:\n:\n"))) == []


def test_event_streams_resume_after_the_last_event(srv):
    connects: list[str | None] = []

    def events(h, s):
        connects.append(s.headers.get("Last-Event-Id"))
        if len(connects) == 1:
            h.sse([event(1, {"n": 1}), b":\n", event(2, {"n": 2})])
        elif len(connects) == 2:
            h.sse([b"event: error\ndata: buffer overflow\n\n"])
        else:
            h.sse([event(3, {"n": 3})], hold=5)

    srv.on("GET", "/events", events)
    with Client(srv.url, "k").events(app_id="web", object_types=["job", "scale"]) as stream:
        got = [stream.next(timeout=5)["data"]["n"] for _ in range(3)]
    assert got == [1, 2, 3]
    assert connects == ["0", "2", "2"]
    first = srv.seen[0]
    assert first.path == "/events?app_id=web&object_types=job%2Cscale"
    assert first.headers["Accept"] == "text/event-stream"
    assert first.headers["Content-Type"] == "application/json"


def test_event_stream_waits_time_out_despite_keepalives(srv):
    srv.on("GET", "/events", lambda h, s: h.sse([b":\n"] * 3, hold=3))
    with Client(srv.url).events() as stream:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.next(timeout=0.5)
        assert time.monotonic() - start < 2


def test_event_stream_of_an_unknown_app_is_not_found(srv):
    srv.on("GET", "/events", lambda h, s: h.reply(404))
    with pytest.raises(NotFound):
        Client(srv.url).events(app_id="nosuch")


# --------------------------------------------------------------------------------------------
# waits built on events


def test_deploy_that_finished_at_once_does_not_wait(srv):
    done = {"id": "d1", "app": "a1", "status": "complete", "finished_at": "2015-12-14T00:00:00Z"}
    srv.on("POST", "/apps/web/deploy", lambda h, s: h.json(200, done))
    assert Client(srv.url).deploy_app_release("web", "r1") == done
    assert [s.path for s in srv.seen] == ["/apps/web/deploy"]
    assert json.loads(srv.seen[0].body) == {"id": "r1"}


def test_deploy_waits_for_the_complete_event(srv):
    d = {"id": "d1", "app": "a1", "status": "pending", "deploy_timeout": 5}
    srv.on("POST", "/apps/web/deploy", lambda h, s: h.json(200, d))
    chunks = [
        event(5, {"status": "pending"}),
        event(6, {"status": "running", "job_type": "web", "job_state": "up"}),
        event(7, {"status": "complete"}),
    ]
    srv.on("GET", "/events", lambda h, s: h.sse(chunks, hold=5))
    Client(srv.url).deploy_app_release("web", "r1")
    stream = srv.seen[1]
    assert stream.path == "/events?app_id=a1&past=true&object_types=deployment&object_id=d1"


def test_a_failed_deploy_says_why(srv):
    d = {"id": "d1", "app": "a1", "status": "pending"}
    srv.on("POST", "/apps/web/deploy", lambda h, s: h.json(200, d))
    failed = event(5, {"status": "failed", "error": "web job failed to start"})
    srv.on("GET", "/events", lambda h, s: h.sse([failed], hold=5))
    with pytest.raises(DeploymentFailed, match="^web job failed to start$"):
        Client(srv.url).deploy_app_release("web", "r1")


def test_delete_app_opens_the_stream_first_and_returns_the_deletion(srv):
    order: list[str] = []
    deleted = threading.Event()

    def events(h, s):
        order.append("stream")
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        h.wfile.flush()
        deleted.wait(5)
        deletion = {"app": "a1", "deleted_routes": [{"id": "r"}], "deleted_resources": []}
        h.wfile.write(event(9, {"app_deletion": deletion, "error": ""}, "app_deletion"))
        h.wfile.flush()
        time.sleep(2)

    def delete(h, s):
        order.append("delete")
        h.reply(200)
        deleted.set()

    srv.on("GET", "/events", events)
    srv.on("DELETE", "/apps/web", delete)
    res = Client(srv.url).delete_app("web")
    assert order == ["stream", "delete"]
    assert len(res["deleted_routes"]) == 1 and res["deleted_resources"] == []
    assert srv.seen[0].path == "/events?app_id=web&object_types=app_deletion"


def test_delete_app_reports_the_workers_error(srv):
    err = event(9, {"app_deletion": {"app": "a1"}, "error": "router unreachable"}, "app_deletion")
    srv.on("GET", "/events", lambda h, s: h.sse([err], hold=3))
    srv.on("DELETE", "/apps/web", lambda h, s: h.reply(200))
    with pytest.raises(ControllerError, match="^router unreachable$"):
        Client(srv.url).delete_app("web")
