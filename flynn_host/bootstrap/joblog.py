"""A bootstrap job's failure, told with its last output lines (read through the attach API)."""

from __future__ import annotations

import asyncio
from typing import Any

from flynn_host.bootstrap.runner import ClusterHost
from flynn_host.runtime import attach


def last_log_lines(host: ClusterHost, job_id: str, lines: int = 5) -> list[str]:
    """The job's last output lines (through the attach API), or [] if they cannot be had."""

    async def read() -> bytes:
        flags = attach.ATTACH_LOGS | attach.ATTACH_STDOUT | attach.ATTACH_STDERR
        request = {"job_id": job_id, "flags": flags, "lines": lines}
        reader, writer = await attach.attach_host(host.client.url, request, host.client.key)
        out = b""
        try:
            while (frame := await attach.read_frame(reader)) is not None:
                if frame.kind == "data" and frame.data:
                    out += frame.data
                elif frame.kind in ("exit", "error"):
                    break
        finally:
            writer.close()
        return out

    async def bounded() -> bytes:
        return await asyncio.wait_for(read(), 3)

    try:
        text = asyncio.run(bounded()).decode(errors="replace")
    except Exception:  # noqa: BLE001 - the log is a courtesy; the step error says enough
        return []
    return text.splitlines()[-lines:]


def job_failure(host: ClusterHost, job_id: str, job: dict[str, Any]) -> str:
    """`host H: job J crashed with exit status 3: ERROR`, then the job's last log lines."""
    text = f"host {host}: job {job_id} {job.get('status')}"
    if job.get("exit_status") is not None:
        text += f" with exit status {job['exit_status']}"
    if job.get("error"):
        text += f": {job['error']}"
    log = last_log_lines(host, job_id)
    if log:
        text += "; its last output:\n" + "\n".join(f"    {line}" for line in log)
    return text
