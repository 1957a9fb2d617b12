"""A synchronous client of the controller's HTTP API: what the `flynn` CLI, the bootstrap and
the tests use to talk to a controller, and nothing else does.

It speaks to the controller exactly as Flynn's 2015 Go client did (the contract is
`flynn-2015-api.md` §1): HTTP Basic auth with an empty user name and the cluster key,
`Content-Type: application/json` on every request, only 200 counts as success, a bare 404 is
`NotFound`, a JSON error body is `APIError` (retried for 10 s while it says `retry: true`), any
other status is `UnexpectedStatus`, and 307 is followed. A TLS pin (base64 of the SHA-256 of
the server's leaf certificate) replaces certificate verification when given. Event streams
are Server-Sent Events read line by line; `events()` resumes after a dropped connection with
`Last-Event-Id`, like the Go client's ResumingStream. An app's log (`app_log`) is read as the
2015 CLI read it: newline-delimited JSON until the controller ends the body.

JSON objects are plain dicts shaped like the Go types (`App`, `Release`, `Deployment`, ...).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "APIError",
    "Client",
    "ControllerError",
    "DeploymentFailed",
    "EventStream",
    "LogStream",
    "NotFound",
    "PinMismatch",
    "SSEError",
    "SSEMessage",
    "SSEParser",
    "UnexpectedStatus",
    "cert_pin",
]

RETRY_FOR = 10.0  # seconds a `retry: true` error is retried (Go: attempts of 10 s, 100 ms apart)
RETRY_EVERY = 0.1
STREAM_CONNECT_RETRY_FOR = 10.0  # a resuming stream's reconnects give up after this long
REQUEST_TIMEOUT = 120.0  # provisioning a resource may take a while; nothing takes longer
MAX_REDIRECTS = 10
DELETE_APP_WAIT = 60.0  # seconds `delete_app` waits for the app_deletion event
DEFAULT_DEPLOY_TIMEOUT = 30  # seconds between deployment events when the app sets none
LOG_READ = 64 * 1024  # the most of a log body taken in one read


# --------------------------------------------------------------------------------------------
# Errors


class ControllerError(Exception):
    """Anything that went wrong talking to the controller."""


class NotFound(ControllerError):
    """A bare 404 (no JSON body): the object does not exist (Go: `controller.ErrNotFound`)."""

    def __init__(self) -> None:
        super().__init__("controller: resource not found")


class APIError(ControllerError):
    """A non-200 answer with a JSON error body `{"code", "message", "detail"?, "retry"}`."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: Any = None,
        retry: bool = False,
        status: int = 0,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.retry = retry
        self.status = status


class UnexpectedStatus(ControllerError):
    """A non-200 answer that is neither a bare 404 nor a JSON error (e.g. a bare 401)."""

    def __init__(self, method: str, url: str, status: int) -> None:
        super().__init__(f"{method} {url}: unexpected status {status}")
        self.method = method
        self.url = url
        self.status = status


class PinMismatch(ControllerError):
    """The server's leaf certificate is not the one the TLS pin names."""

    def __init__(self) -> None:
        super().__init__("pinned: the peer leaf certificate did not match the provided pin")


class SSEError(ControllerError):
    """An `event: error` message of an event stream, or a malformed message."""


class DeploymentFailed(ControllerError):
    """A deployment ended with status `failed`; the message is the deployment's error."""


# --------------------------------------------------------------------------------------------
# TLS


def cert_pin(der: bytes) -> str:
    """The TLS pin of a certificate: base64 (standard, padded) of SHA-256 of its DER bytes."""
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS without chain or host name verification, checked against a pin instead.

    The SNI name is still the URL's host (http.client sends it), so a router serving several
    certificates picks the right one; then the leaf's digest must equal the pin.
    """

    def __init__(self, host: str, port: int | None, pin: bytes, timeout: float | None) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._pin = pin

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(hashlib.sha256(der).digest(), self._pin):
            self.sock.close()
            raise PinMismatch()


# --------------------------------------------------------------------------------------------
# Server-Sent Events


@dataclass
class SSEMessage:
    """One message of an event stream: its `data:` lines joined, and whether it was an error."""

    data: str
    error: bool = False


class SSEParser:
    """The line-level SSE reader of Flynn's Go client (`pkg/sse`).

    Lines end in `\\n`; `data: ` lines are appended without a separator; a line starting
    `event: error` marks the message as an error; `id:` and `:` comment lines and anything
    else are ignored; a blank line (`\\n` alone) ends the message. A `\\r\\n` blank line is
    *not* a terminator, as in Go.
    """

    def __init__(self) -> None:
        self._data: list[str] = []
        self._error = False
        self._started = False

    def feed(self, line: bytes) -> SSEMessage | None:
        """Take one line (with its `\\n`); return a message when `line` completes one."""
        if line == b"\n":
            msg = SSEMessage("".join(self._data), self._error)
            self._data, self._error, self._started = [], False, False
            return msg
        text = line.decode("utf-8", errors="replace")
        if text.endswith("\n"):
            text = text[:-1]
        if text.startswith("data: "):
            self._data.append(text[len("data: ") :])
            self._started = True
        elif text.startswith("event: error"):
            self._error = True
            self._started = True
        return None

    def parse(self, lines: Iterable[bytes]) -> Iterator[SSEMessage]:
        for line in lines:
            msg = self.feed(line)
            if msg is not None:
                yield msg


def decode_message(msg: SSEMessage) -> Any:
    """A message's JSON, or SSEError for an error message or one that is not JSON."""
    if msg.error:
        raise SSEError(f"Server error: {msg.data}")
    try:
        return json.loads(msg.data)
    except ValueError as e:
        raise SSEError(f"sse: invalid message {msg.data!r}: {e}") from None


class _RawStream:
    """One open SSE response: its connection, and a reader with an optional deadline."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        sock: socket.socket | None,
    ) -> None:
        self.conn = conn
        self.resp = resp
        # http.client drops conn.sock once a response will close the connection, but the
        # response still reads from it: keep it to set read deadlines on
        self.sock = sock
        self.parser = SSEParser()

    def next_message(self, deadline: float | None) -> SSEMessage | None:
        """The next message, None at the end of the body; TimeoutError past `deadline`."""
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for an event")
                if self.sock is not None:
                    self.sock.settimeout(left)
            elif self.sock is not None:
                self.sock.settimeout(None)
            try:
                line = self.resp.readline()
            except TimeoutError:
                raise TimeoutError("timed out waiting for an event") from None
            if not line:
                return None
            msg = self.parser.feed(line)
            if msg is not None:
                return msg

    def close(self) -> None:
        try:
            if self.sock is not None:
                # unblock and drop the socket at once rather than read the rest of the body
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.resp.close()
        self.conn.close()


class EventStream:
    """A resuming stream of controller events (`GET /events`), opened on construction.

    Iterating yields Event dicts (`id`, `app`, `object_type`, `object_id`, `data`,
    `created_at`). When the body ends or carries `event: error`, it reconnects with
    `Last-Event-Id` = the last event's id (reconnects are retried for 10 s; a bare 404 is
    final). `next(timeout)` waits at most `timeout` seconds (comments do not count as events).
    """

    def __init__(self, client: Client, path: str, last_event_id: int = 0) -> None:
        self._client = client
        self._path = path
        self.last_event_id = last_event_id
        self._raw: _RawStream | None = None
        self._closed = False
        self._raw = self._connect()

    def _connect(self) -> _RawStream:
        headers = {"Accept": "text/event-stream", "Last-Event-Id": str(self.last_event_id)}
        return self._client.open_stream("GET", self._path, headers)

    def _reconnect(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        give_up = time.monotonic() + STREAM_CONNECT_RETRY_FOR
        while True:
            try:
                self._raw = self._connect()
                return
            except NotFound:
                raise
            except (ControllerError, OSError):
                if time.monotonic() > give_up:
                    raise
                time.sleep(RETRY_EVERY)

    def next(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event; TimeoutError if none arrives within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise StopIteration
            if self._raw is None:
                self._reconnect()
            assert self._raw is not None
            try:
                msg = self._raw.next_message(deadline)
            except TimeoutError:
                raise
            except (OSError, http.client.HTTPException):
                msg = None
            if msg is None or msg.error:
                # the body ended (or the server said it failed): resume after the last event
                self._raw.close()
                self._raw = None
                continue
            event = decode_message(msg)
            if isinstance(event, dict) and isinstance(event.get("id"), int):
                self.last_event_id = event["id"]
            return event  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return self.next()

    def close(self) -> None:
        self._closed = True
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogStream:
    """An open `GET /apps/:app/log` body. `batches()` yields the messages that arrived together
    (so a reader can print them and flush once), each a dict shaped like the logaggregator
    Message (`timestamp`, `source`, `process_type`, `job_id`, `msg`, `stream`, `host_id`),
    until the controller ends the body; iterating yields them one by one. Reads wait as long
    as it takes: a follow may be quiet for hours."""

    def __init__(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, url: str
    ) -> None:
        self.conn = conn
        self.resp = resp
        self.url = url
        self.sock: socket.socket | None = getattr(conn, "flynn_sock", None)

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        if self.sock is not None:
            self.sock.settimeout(None)
        rest = b""
        while True:
            try:
                chunk = self.resp.read1(LOG_READ)
            except (OSError, http.client.HTTPException) as e:
                raise ControllerError(f"GET {self.url}: {_describe(e)}") from None
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            batch = [self._decode(line) for line in lines if line.strip()]
            if batch:
                yield batch
        if rest.strip():
            yield [self._decode(rest)]

    def _decode(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise ControllerError(
                f"GET {self.url}: invalid log message {line[:200]!r}: {e}"
            ) from None
        return _obj(msg)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches():
            yield from batch

    def close(self) -> None:
        self.resp.close()
        self.conn.close()

    def __enter__(self) -> LogStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# The client


def error_json(status: int, content_type: str, data: bytes) -> APIError | None:
    """The error a response with Flynn's error JSON (`{"code", "message", "detail",
    "retry"}`) stands for; None for any other body."""
    if "application/json" not in content_type:
        return None
    try:
        err = json.loads(data)
    except ValueError:
        return None
    if not (isinstance(err, dict) and "code" in err):
        return None
    return APIError(str(err.get("code", "")), str(err.get("message", "")), err.get("detail"),
                    bool(err.get("retry", False)), status)  # fmt: skip


class Client:
    """A controller at `url` (`https://controller.<domain>` or `http://host:port`).

    `key` is the controller's auth key; `pin` a TLS pin (base64, see `cert_pin`) that replaces
    certificate verification; `ca_file` a PEM bundle to verify against instead of the
    system's roots when there is no pin.
    """

    def __init__(
        self,
        url: str,
        key: str = "",
        pin: str | None = None,
        ca_file: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.pin = base64.b64decode(pin, validate=True) if pin else None
        self.ca_file = ca_file
        self.timeout = timeout
        split = urllib.parse.urlsplit(self.url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise ControllerError(f"invalid controller URL {url!r}")

    # -- transport ---------------------------------------------------------------------------

    def _connection(self, url: str, timeout: float | None) -> http.client.HTTPConnection:
        split = urllib.parse.urlsplit(url)
        host = split.hostname or ""
        if split.scheme == "http":
            return http.client.HTTPConnection(host, split.port, timeout=timeout)
        if self.pin is not None:
            return _PinnedHTTPSConnection(host, split.port, self.pin, timeout)
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return http.client.HTTPSConnection(host, split.port, timeout=timeout, context=ctx)

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        auth = base64.b64encode(f":{self.key}".encode()).decode()
        headers = {"Authorization": f"Basic {auth}", "Content-Type": "application/json"}
        headers.update(extra or {})
        return headers

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str] | None,
        timeout: float | None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
        """One request, following 307s; returns the connection, response and final URL.
        The connection's socket is also kept as `conn.flynn_sock`."""
        url = self.url + path
        for _ in range(MAX_REDIRECTS + 1):
            split = urllib.parse.urlsplit(url)
            target = urllib.parse.urlunsplit(("", "", split.path or "/", split.query, ""))
            conn = self._connection(url, timeout)
            try:
                conn.request(method, target, body=body, headers=self._headers(headers))
                conn.flynn_sock = conn.sock  # type: ignore[attr-defined]
                resp = conn.getresponse()
            except PinMismatch:
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise ControllerError(f"{method} {url}: {_describe(e)}") from None
            if resp.status == 307 and resp.getheader("Location"):
                location = resp.getheader("Location", "")
                resp.read()
                conn.close()
                url = urllib.parse.urljoin(url, location)
                continue
            return conn, resp, url
        raise ControllerError(f"{method} {self.url + path}: too many redirects")

    def _check(self, method: str, url: str, resp: http.client.HTTPResponse) -> None:
        """Raise the error a non-200 response stands for (reads its body)."""
        if resp.status == 200:
            return
        data = resp.read()
        # (Go would report any JSON body as an error, `: ` for one without a code)
        if (
            err := error_json(resp.status, resp.getheader("Content-Type", "") or "", data)
        ) is not None:
            raise err
        if resp.status == 404:
            raise NotFound()
        raise UnexpectedStatus(method, url, resp.status)

    def raw_request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request without retries: the 200 response and its body, or the error."""
        data = None if body is None else json.dumps(body).encode()
        conn, resp, url = self._send(method, path, data, headers, self.timeout)
        try:
            self._check(method, url, resp)
            return resp, resp.read()
        finally:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """A JSON request, retried while the controller says `retry: true`; the decoded JSON
        body (None for an empty one)."""
        give_up = time.monotonic() + RETRY_FOR
        while True:
            try:
                _, data = self.raw_request(method, path, body, headers)
            except APIError as e:
                if e.retry and time.monotonic() < give_up:
                    time.sleep(RETRY_EVERY)
                    continue
                raise
            if not data.strip():
                return None
            try:
                return json.loads(data)
            except ValueError as e:
                raise ControllerError(f"{method} {self.url + path}: invalid JSON: {e}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def open_stream(self, method: str, path: str, headers: dict[str, str]) -> _RawStream:
        """Open an SSE response (status checked; headers read, body not)."""
        conn, resp, url = self._send(method, path, None, headers, self.timeout)
        try:
            self._check(method, url, resp)
        except BaseException:
            conn.close()
            raise
        return _RawStream(conn, resp, getattr(conn, "flynn_sock", None))

    # -- apps --------------------------------------------------------------------------------

    def create_app(self, app: dict[str, Any]) -> dict[str, Any]:
        """POST /apps; `app` as the Go CLI sends it (`{"name": ..., "meta": null}`)."""
        return _obj(self.post("/apps", app))

    def get_app(self, app: str) -> dict[str, Any]:
        return _obj(self.get(f"/apps/{_q(app)}"))

    def app_list(self) -> list[dict[str, Any]]:
        return _list(self.get("/apps"))

    def update_app(self, app: dict[str, Any]) -> dict[str, Any]:
        """POST /apps/:id (the server applies `meta` and `strategy`)."""
        return _obj(self.post(f"/apps/{_q(app['id'])}", app))

    def update_app_meta(self, app: dict[str, Any]) -> dict[str, Any]:
        """POST /apps/<app uuid>/meta with the whole App object carrying the new `meta`."""
        if not app.get("id"):
            raise ControllerError("controller: missing id")
        return _obj(self.post(f"/apps/{_q(app['id'])}/meta", app))

    def delete_app(self, app: str, wait: float = DELETE_APP_WAIT) -> dict[str, Any]:
        """Delete `app` and wait for the worker's `app_deletion` event; its `app_deletion`
        object (`app`, `deleted_routes`, `deleted_resources`)."""
        with self.events(app_id=app, object_types=["app_deletion"]) as stream:
            self.delete(f"/apps/{_q(app)}")
            try:
                event = stream.next(timeout=wait)
            except TimeoutError:
                raise ControllerError("timed out waiting for app deletion") from None
        data = event.get("data") or {}
        if data.get("error"):
            raise ControllerError(str(data["error"]))
        return dict(data.get("app_deletion") or {})

    # -- releases and artifacts --------------------------------------------------------------

    def app_release(self, app: str) -> dict[str, Any]:
        """GET /apps/:app/release: the app's current release (NotFound when it has none)."""
        return _obj(self.get(f"/apps/{_q(app)}/release"))

    def set_app_release(self, app: str, release_id: str) -> dict[str, Any]:
        """PUT /apps/:app/release: make `release_id` current without a deployment."""
        return _obj(self.put(f"/apps/{_q(app)}/release", {"id": release_id}))

    def app_release_list(self, app: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/apps/{_q(app)}/releases"))

    def create_release(self, release: dict[str, Any]) -> dict[str, Any]:
        return _obj(self.post("/releases", release))

    def delete_app_release(self, app: str, release_id: str) -> None:
        """Delete a release the app does not run (and its artifact if nothing else uses it)."""
        self.delete(f"/apps/{_q(app)}/releases/{_q(release_id)}")

    def get_release(self, release_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/releases/{_q(release_id)}"))

    def release_list(self) -> list[dict[str, Any]]:
        return _list(self.get("/releases"))

    def create_artifact(self, artifact: dict[str, Any]) -> dict[str, Any]:
        return _obj(self.post("/artifacts", artifact))

    def get_artifact(self, artifact_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/artifacts/{_q(artifact_id)}"))

    def artifact_list(self) -> list[dict[str, Any]]:
        return _list(self.get("/artifacts"))

    # -- formations --------------------------------------------------------------------------

    def get_formation(self, app: str, release_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/apps/{_q(app)}/formations/{_q(release_id)}"))

    def get_expanded_formation(self, app: str, release_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/apps/{_q(app)}/formations/{_q(release_id)}?expand=true"))

    def put_formation(self, formation: dict[str, Any]) -> dict[str, Any]:
        """PUT /apps/:app/formations/:release; `formation` has `app`, `release`, `processes`."""
        if not formation.get("app") or not formation.get("release"):
            raise ControllerError("controller: missing app id and/or release id")
        path = f"/apps/{_q(formation['app'])}/formations/{_q(formation['release'])}"
        return _obj(self.put(path, formation))

    def formation_list(self, app: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/apps/{_q(app)}/formations"))

    def delete_formation(self, app: str, release_id: str) -> None:
        self.delete(f"/apps/{_q(app)}/formations/{_q(release_id)}")

    # -- deployments -------------------------------------------------------------------------

    def create_deployment(self, app: str, release_id: str) -> dict[str, Any]:
        return _obj(self.post(f"/apps/{_q(app)}/deploy", {"id": release_id}))

    def deploy_app_release(self, app: str, release_id: str) -> dict[str, Any]:
        """Deploy `release_id` to `app` and wait until the deployment is complete.

        A deployment the controller finished at once (the app ran no processes) returns
        straight away; otherwise its events are watched (replayed from the start) until
        `complete`, or `failed` which raises DeploymentFailed. The wait between two events
        is the deployment's `deploy_timeout` (30 s when unset).
        """
        deployment = self.create_deployment(app, release_id)
        if deployment.get("finished_at"):
            return deployment
        timeout = float(deployment.get("deploy_timeout") or DEFAULT_DEPLOY_TIMEOUT)
        with self.events(
            app_id=deployment.get("app") or app,
            object_id=deployment["id"],
            object_types=["deployment"],
            past=True,
        ) as stream:
            while True:
                try:
                    event = stream.next(timeout=timeout)
                except TimeoutError:
                    raise ControllerError(
                        f"timed out waiting for deployment {deployment['id']}"
                    ) from None
                data = event.get("data") or {}
                status = data.get("status")
                if status == "complete":
                    return deployment
                if status == "failed":
                    raise DeploymentFailed(str(data.get("error") or "deployment failed"))

    def deployment_list(self, app: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/apps/{_q(app)}/deployments"))

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/deployments/{_q(deployment_id)}"))

    # -- jobs --------------------------------------------------------------------------------

    def job_list(self, app: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/apps/{_q(app)}/jobs"))

    def get_job(self, app: str, job_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/apps/{_q(app)}/jobs/{_q(job_id)}"))

    def run_job_detached(self, app: str, new_job: dict[str, Any]) -> dict[str, Any]:
        return _obj(self.post(f"/apps/{_q(app)}/jobs", new_job))

    def delete_job(self, app: str, job_id: str) -> None:
        self.delete(f"/apps/{_q(app)}/jobs/{_q(job_id)}")

    def app_log(
        self,
        app: str,
        follow: bool = False,
        job_id: str = "",
        lines: int | None = None,
        process_type: str | None = None,
    ) -> LogStream:
        """GET /apps/:app/log with only the options given (as the 2015 CLI sends them); the
        open body, once the controller has answered 200 (not retried)."""
        params: dict[str, str] = {}
        if follow:
            params["follow"] = "true"
        if job_id:
            params["job_id"] = job_id
        if lines is not None:
            params["lines"] = str(lines)
        if process_type is not None:
            params["process_type"] = process_type
        path = f"/apps/{_q(app)}/log" + ("?" + urllib.parse.urlencode(params) if params else "")
        conn, resp, url = self._send("GET", path, None, None, self.timeout)
        try:
            self._check("GET", url, resp)
        except BaseException:
            conn.close()
            raise
        return LogStream(conn, resp, url)

    async def run_job_attached(
        self, app: str, new_job: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """POST /apps/:app/jobs with `Upgrade: flynn-attach/0` on a connection of its own:
        once the controller answers 101, the connection carries the job's attach frames
        (§4 of the 2015 contract); the streams are returned for the caller to speak them.
        TLS as every request (a pin replaces verification); not retried. A refusal raises
        the error its answer stands for (`APIError`, `NotFound`, `UnexpectedStatus`)."""
        split = urllib.parse.urlsplit(self.url)
        path = f"{split.path.rstrip('/')}/apps/{_q(app)}/jobs"
        url = self.url + f"/apps/{_q(app)}/jobs"
        tls: ssl.SSLContext | None = None
        if split.scheme == "https":
            tls = ssl.create_default_context(cafile=self.ca_file)
            if self.pin is not None:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        port = split.port or (443 if tls else 80)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    split.hostname, port, ssl=tls, server_hostname=split.hostname if tls else None
                ),
                self.timeout,
            )
        except (OSError, TimeoutError) as e:
            raise ControllerError(f"POST {url}: {_describe(e)}") from None
        try:
            if tls is not None and self.pin is not None:
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
                if not hmac.compare_digest(hashlib.sha256(der).digest(), self.pin):
                    raise PinMismatch()
            await _upgrade(reader, writer, split.netloc, path, self._headers(None), new_job, url)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    # -- providers and resources -------------------------------------------------------------

    def create_provider(self, provider: dict[str, Any]) -> dict[str, Any]:
        return _obj(self.post("/providers", provider))

    def get_provider(self, provider: str) -> dict[str, Any]:
        return _obj(self.get(f"/providers/{_q(provider)}"))

    def provider_list(self) -> list[dict[str, Any]]:
        return _list(self.get("/providers"))

    def provision_resource(
        self, provider: str, apps: list[str], config: Any = None
    ) -> dict[str, Any]:
        """POST /providers/:provider/resources `{"apps": [...], "config": ...}`: the Resource
        (with the `env` the app should get)."""
        body = {"apps": apps, "config": config}
        return _obj(self.post(f"/providers/{_q(provider)}/resources", body))

    def get_resource(self, provider: str, resource_id: str) -> dict[str, Any]:
        return _obj(self.get(f"/providers/{_q(provider)}/resources/{_q(resource_id)}"))

    def delete_resource(self, provider: str, resource_id: str) -> dict[str, Any]:
        """Deprovision and delete a resource; returns the deleted Resource."""
        return _obj(self.delete(f"/providers/{_q(provider)}/resources/{_q(resource_id)}"))

    def resource_list(self, provider: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/providers/{_q(provider)}/resources"))

    def app_resource_list(self, app: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/apps/{_q(app)}/resources"))

    # -- routes ------------------------------------------------------------------------------

    def create_route(self, app: str, route: dict[str, Any]) -> dict[str, Any]:
        return _obj(self.post(f"/apps/{_q(app)}/routes", route))

    def route_list(self, app: str) -> list[dict[str, Any]]:
        return _list(self.get(f"/apps/{_q(app)}/routes"))

    def get_route(self, app: str, route_id: str) -> dict[str, Any]:
        """GET /apps/:app/routes/<type>/<id> (`route_id` is `<type>/<uuid>`)."""
        return _obj(self.get(f"/apps/{_q(app)}/routes/{_route_path(route_id)}"))

    def update_route(self, app: str, route_id: str, route: dict[str, Any]) -> dict[str, Any]:
        return _obj(self.put(f"/apps/{_q(app)}/routes/{_route_path(route_id)}", route))

    def delete_route(self, app: str, route_id: str) -> None:
        self.delete(f"/apps/{_q(app)}/routes/{_route_path(route_id)}")

    # -- events ------------------------------------------------------------------------------

    def events(
        self,
        app_id: str | None = None,
        object_types: Iterable[str] = (),
        object_id: str | None = None,
        past: bool = False,
        count: int = 0,
        last_event_id: int = 0,
    ) -> EventStream:
        """Open a resuming event stream (connected when this returns)."""
        return EventStream(
            self,
            "/events" + _events_query(app_id, object_types, object_id, past, count),
            last_event_id,
        )

    def list_events(
        self,
        app_id: str | None = None,
        object_types: Iterable[str] = (),
        object_id: str | None = None,
        before_id: int | None = None,
        since_id: int | None = None,
        count: int = 0,
    ) -> list[dict[str, Any]]:
        """GET /events as a JSON list (newest first)."""
        query = _events_query(app_id, object_types, object_id, False, count)
        extra = {}
        if before_id is not None:
            extra["before_id"] = str(before_id)
        if since_id is not None:
            extra["since_id"] = str(since_id)
        if extra:
            query += ("&" if query else "?") + urllib.parse.urlencode(extra)
        return _list(self.request("GET", "/events" + query, headers={"Accept": "application/json"}))

    def get_event(self, event_id: int) -> dict[str, Any]:
        return _obj(self.get(f"/events/{event_id}"))

    # -- cluster -----------------------------------------------------------------------------

    def ca_cert(self) -> bytes:
        """GET /ca-cert: the cluster CA's PEM, verbatim."""
        _, data = self.raw_request("GET", "/ca-cert")
        return data

    def status(self) -> dict[str, Any]:
        """GET /.well-known/status: `{"status": ..., "version": ...}`."""
        return dict(_obj(self.get("/.well-known/status")).get("data") or {})

    def ping(self) -> bool:
        try:
            self.raw_request("GET", "/ping")
        except ControllerError:
            return False
        return True


# --------------------------------------------------------------------------------------------
# Helpers


async def _upgrade(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    netloc: str,
    path: str,
    headers: dict[str, str],
    new_job: dict[str, Any],
    url: str,
) -> None:
    """Send the attach request and read the answer's head; an error unless it is the 101."""
    body = json.dumps(new_job).encode()
    head = {
        "Host": netloc,
        **headers,
        "Upgrade": "flynn-attach/0",
        "Connection": "Upgrade",
        "Content-Length": str(len(body)),
    }
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    writer.write(request.encode() + b"\r\n" + body)
    try:
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise ControllerError(f"POST {url}: {_describe(e)}") from None
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ControllerError(f"POST {url}: bad HTTP response {status_line!r}")
    status = int(parts[1])
    if status == 101:
        return
    fields = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    data = b""
    try:
        if fields.get("content-length", "").isdigit():
            data = await reader.readexactly(min(int(fields["content-length"]), 1 << 20))
        elif status != 404:
            data = await reader.read(1 << 20)
    except (OSError, asyncio.IncompleteReadError):
        pass
    if (err := error_json(status, fields.get("content-type", ""), data)) is not None:
        raise err
    if status == 404:
        raise NotFound()
    raise UnexpectedStatus("POST", url, status)


def _q(segment: str) -> str:
    """A path segment, escaped (names and UUIDs never need it, but a typo must not route)."""
    return urllib.parse.quote(str(segment), safe="")


def _route_path(route_id: str) -> str:
    typ, sep, rid = route_id.partition("/")
    return f"{_q(typ)}/{_q(rid)}" if sep else _q(route_id)


def _events_query(
    app_id: str | None,
    object_types: Iterable[str],
    object_id: str | None,
    past: bool,
    count: int,
) -> str:
    params: dict[str, str] = {}
    if app_id:
        params["app_id"] = app_id
    if past:
        params["past"] = "true"
    types = list(object_types)
    if types:
        params["object_types"] = ",".join(types)
    if object_id:
        params["object_id"] = object_id
    if count > 0:
        params["count"] = str(count)
    return "?" + urllib.parse.urlencode(params) if params else ""


def _obj(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ControllerError(f"controller: expected a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ControllerError(f"controller: expected a JSON list, got {type(value).__name__}")
    return value


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"x509: {e.verify_message or e}"
    if isinstance(e, socket.gaierror):
        return f"no such host ({e.strerror})"
    if isinstance(e, TimeoutError):
        return "i/o timeout"
    return str(e) or type(e).__name__
