"""Calling a cluster service's HTTP API from a bootstrap action, by its discoverd name.

Bootstrap runs on a host, outside any job, where discoverd's DNS is not the resolver: a URL
whose host is `NAME.discoverd` (or `leader.NAME.discoverd`) is resolved through discoverd's
HTTP API as `wait` does (`flynn_host.bootstrap.wait.lookup`), and each instance is tried in
turn until one answers. Used by `run-app` to provision resources and by the controller's
actions (`add-app`, `add-provider`) to call the controller.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from flynn_host.bootstrap.runner import State, StepError
from flynn_host.bootstrap.wait import DISCOVERD_SUFFIX, NotYet, lookup

REQUEST_TIMEOUT = 30.0
# how long a service that cannot be reached (no instance yet, connection refused) is retried
RETRY_FOR = 30.0


@dataclass
class Response:
    status: int
    body: Any  # the parsed JSON, or the text when it is not JSON
    base: str  # the instance that answered, `http://ip:port`


def bases(state: State, url: str) -> list[str]:
    """`scheme://ip:port` of each instance `url`'s host names (the URL's own when it is not a
    discoverd name); NotYet when discoverd knows none."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host.endswith(DISCOVERD_SUFFIX):
        return [f"{parts.scheme}://{parts.netloc}"]
    out = []
    for addr in lookup(state, host):
        ip, _, port = addr.rpartition(":")
        out.append(f"{parts.scheme}://{ip}:{parts.port or port}")
    return out


def request(
    state: State,
    method: str,
    url: str,
    body: Any = None,
    *,
    key: str | None = None,
    retry_for: float | None = None,
) -> Response:
    """One HTTP request (a JSON body, HTTP Basic auth with password `key` when given) to the
    first instance of `url`'s service that answers, whatever its status — except a 5xx whose
    Flynn error says `"retry": true`, which is tried again (its last answer is returned when
    time is up). StepError when none answered within `retry_for` seconds (default
    `RETRY_FOR`)."""
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Accept": "application/json", "Host": parts.netloc}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f":{key}".encode()).decode()
    deadline = time.monotonic() + (RETRY_FOR if retry_for is None else retry_for)
    while True:
        errors = []
        try:
            targets = bases(state, url)
        except NotYet as exc:
            targets, errors = [], [str(exc)]
        for base in targets:
            try:
                resp = _send(base, method, path, data, headers)
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{base}: {exc}")
                continue
            # Flynn's error JSON with `retry: true` says the same request may succeed later
            # (the service could not reach another one yet): try again while there is time
            retryable = isinstance(resp.body, dict) and resp.body.get("retry") is True
            if not (resp.status >= 500 and retryable) or time.monotonic() > deadline:
                return resp
            errors.append(f"{base}: {resp.status} {describe(resp)}")
        if time.monotonic() > deadline:
            raise StepError(f"{method} {url}: no answer: {'; '.join(errors)}")
        time.sleep(0.5)


def _send(
    base: str, method: str, path: str, data: bytes | None, headers: dict[str, str]
) -> Response:
    parts = urllib.parse.urlsplit(base)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    text = raw.decode(errors="replace")
    try:
        parsed: Any = json.loads(text) if text.strip() else None
    except ValueError:
        parsed = text
    return Response(resp.status, parsed, base)


def describe(resp: Response) -> str:
    """An error answer in a few words: Flynn's `{"code", "message"}`, else the text."""
    body = resp.body
    if isinstance(body, dict) and body.get("message"):
        return f"{resp.status} {body.get('code', '')}: {body['message']}".replace(" :", ":")
    text = body if isinstance(body, str) else json.dumps(body)
    return f"{resp.status}: {text[:300]}" if text and text != "null" else str(resp.status)
