"""Property-based fuzzing of a real controller from its own `/openapi.json` (schemathesis,
positive and negative data, with the key): no request may make it answer 5xx, and every
answer other than 200 that is not a bare 401/404/405 must be Flynn's error JSON
(`{"code","message","retry"[,"detail"]}`, `Content-Type: application/json`, §1.2), since that
is all the CLI can read. Slow: `make test-slow`; about a minute or two.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from controller_http import Api, auth_header
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.slow

EXAMPLES = 30  # per operation and generation mode: keeps the whole run to a few minutes
BARE_OK = {401, 404, 405}
# streams that never end on their own (the log's follow mode comes with the logs issue)
STREAMS = {("GET", "/apps/{apps_id}/log")}


@pytest.fixture(scope="module")
def openapi(api: Api) -> Any:
    return schemathesis.openapi.from_url(
        f"{api.url}/openapi.json", headers={"Authorization": auth_header(api.key)}, timeout=10
    )


schema = schemathesis.pytest.from_fixture("openapi")


def check_flynn_answer(method: str, path: str, status: int, headers: Any, body: bytes) -> None:
    what = f"{method} {path} → {status} {headers.get('Content-Type')!r} {body[:300]!r}"
    assert status < 500, what
    if status == 200:
        return
    content_type = headers.get("Content-Type") or ""
    if status in BARE_OK and "json" not in content_type:
        return
    assert content_type.split(";")[0].strip() == "application/json", what
    try:
        err = json.loads(body)
    except ValueError as e:
        raise AssertionError(f"not JSON: {what}") from e
    assert isinstance(err, dict), what
    assert {"code", "message", "retry"} <= set(err) <= {"code", "message", "retry", "detail"}, what
    assert isinstance(err["code"], str) and isinstance(err["message"], str), what
    assert isinstance(err["retry"], bool), what


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_fuzz(case: Any, api: Api) -> None:
    if (case.method.upper(), case.path) in STREAMS:
        pytest.skip("a stream without end")
    # `Accept: application/json` turns GET /events into its listing (otherwise a stream)
    headers = {"Authorization": auth_header(api.key), "Accept": "application/json"}
    if case.path == "/events" and case.headers and "Accept" in case.headers:
        case.headers.pop("Accept")
    r = case.call(base_url=api.url, headers=headers, timeout=15)
    check_flynn_answer(
        case.method.upper(), case.formatted_path, r.status_code, r.headers, r.content
    )
