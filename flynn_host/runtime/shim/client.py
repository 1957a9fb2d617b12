"""The daemon's side of the shim: `connect_shim` and `shim_request` talk to a running shim's
`JOBDIR/attach.sock` (one JSON request line, then the reply or a stream), and `ShimPool` keeps
a few shims started ahead, so a job's start does not wait for Python's start-up and imports.
Nothing here runs in the shim itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from flynn_host.runtime.shim.startup import json_line, unix_path


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


class ShimPool:
    """A few shims started ahead of time, already past Python's start-up and imports (most
    of a shim's start cost), each waiting on its stdin for the job directory it will own.
    An idle shim whose stdin closes exits, so none outlives the daemon that started it."""

    def __init__(self, command: list[str], jobs_dir: Path, size: int) -> None:
        self.command = [*command, str(jobs_dir), "--idle"]
        self.size = size
        self.idle: list[asyncio.subprocess.Process] = []
        self._filling: asyncio.Task[None] | None = None

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # once it owns a job, it must outlive a daemon restart
        )

    async def _fill(self) -> None:
        while len(self.idle) < self.size:
            self.idle.append(await self._spawn())

    def refill(self) -> None:
        if self.size and (self._filling is None or self._filling.done()):
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    def take(self) -> asyncio.subprocess.Process | None:
        """An idle shim that is still alive, or None (the caller starts one cold)."""
        while self.idle:
            proc = self.idle.pop(0)
            if proc.returncode is None:
                self.refill()
                return proc
        self.refill()
        return None

    async def close(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(BaseException):
                await self._filling
        idle, self.idle = self.idle, []
        for proc in idle:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: no job is coming, the shim exits
        for proc in idle:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
