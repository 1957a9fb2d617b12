"""Deploy progress in the app's own log: `flynn log` shows each step of a deployment among the
app's output, with source `controller`, as

    2026-12-03T12:00:01.000000Z controller[deploy.<deployment id>]: web job <id> up

One line per deployment event the deployer emits (`deployer.deployment_event`): the deployment
starting (`deploying release <id> with <strategy>: web=3`), each job of it starting, up or down,
and the end (`deployment complete`, or `deployment failed: <error>` on stderr).

The lines go straight to the log aggregators (`flynn_logaggregator.client.Emitter`, best
effort: a deploy never waits for them): to the syslog addresses in `LOGAGGREGATOR_SYSLOG`
(`ip:port,...`) when set, else to the instances of service `logaggregator` in discoverd when the
process has `DISCOVERD`, else nowhere. The emitter starts with the first line and `close` (at
the process's shutdown) sends what is queued.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flynn_logaggregator.client import Emitter, Message

SOURCE = "controller"
PROCESS_TYPE = "deploy"

_emitter: Emitter | None = None
_closers: list[Any] = []  # what the address source opened (a discoverd client), for `close`


def _addrs_source() -> Any:
    static = [a.strip() for a in os.environ.get("LOGAGGREGATOR_SYSLOG", "").split(",") if a.strip()]
    if static:

        async def fixed() -> list[str]:
            return static

        return fixed
    if not os.environ.get("DISCOVERD") or os.environ.get("DISCOVERD") == "none":
        return None
    from flynn_discoverd.client import Client

    client = Client()
    _closers.append(client.close)

    async def from_discoverd() -> list[str]:
        return [i.addr for i in await client.instances("logaggregator")]

    return from_discoverd


def emitter() -> Emitter | None:
    """The process's emitter, made on first use (None when there is nowhere to send)."""
    global _emitter
    if _emitter is None:
        source = _addrs_source()
        if source is not None:
            _emitter = Emitter(source)
    return _emitter


async def close() -> None:
    global _emitter
    if _emitter is not None:
        await _emitter.close()
        _emitter = None
    while _closers:
        await _closers.pop()()


def text(row: Any, status: str, job: dict[str, Any] | None = None, error: str | None = None) -> str:
    """The log line of one deployment event."""
    if job is not None:
        return f"{job.get('type') or 'a'} job {job.get('id', '')} {job.get('state', '')}".strip()
    if status == "pending":
        counts = ", ".join(f"{t}={n}" for t, n in sorted((row["processes"] or {}).items()))
        return (f"deploying release {row['new_release_id']} with {row['strategy']}"
                + (f": {counts}" if counts else ""))  # fmt: skip
    if status == "failed":
        return f"deployment failed: {error or 'unknown error'}"
    return f"deployment {status}"


def note(
    row: Any, status: str, job: dict[str, Any] | None = None, error: str | None = None
) -> None:
    """Send the line of one deployment event to the app's log (never waits)."""
    out = emitter()
    if out is None:
        return
    out.send(
        Message(
            app_id=str(row["app_id"]),
            host_id=os.environ.get("FLYNN_JOB_ID", "").partition("-")[0] or SOURCE,
            job_id=str(row["deployment_id"]),
            process_type=PROCESS_TYPE,
            stream="stderr" if status == "failed" else "stdout",
            time=time.time_ns(),
            seq=0,
            msg=text(row, status, job, error),
            source=SOURCE,
        )
    )
