"""The daemon's side of the shim: `connect_shim` and `shim_request` talk to a running shim's
`JOBDIR/attach.sock` (one JSON request line, then the reply or a stream). Nothing here runs
in the shim itself.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from flynn_host.shim.startup import json_line, unix_path


async def connect_shim(job_dir: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a job's shim socket (also when the job directory's path is long)."""
    with unix_path(os.path.join(job_dir, "attach.sock")) as name:
        # log lines reach 64 KiB before JSON escaping: allow longer lines than asyncio's default
        return await asyncio.open_unix_connection(name, limit=1 << 20)


async def shim_request(job_dir: str, request: dict[str, Any]) -> dict[str, Any]:
    """Send a one-reply request (`wait`, `signal`, `status`) and return the reply."""
    reader, writer = await connect_shim(job_dir)
    try:
        writer.write(json_line(request))
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ConnectionError("the shim closed the connection without replying")
    return json.loads(line)
