"""`flynn-host component ping [--port PORT]`: an HTTP server answering Flynn's status check,
`GET /.well-known/status`, with the job it runs in. It proves that a job runs the host's own
code (the bundle mounted at /.flynn-host) and is the pattern later components follow."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

from aiohttp import web

from flynn_host import __version__


async def status(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "data": {
                "status": "healthy",
                "version": __version__,
                "detail": {
                    "component": "ping",
                    "job_id": os.environ.get("FLYNN_JOB_ID", ""),
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                },
            }
        }
    )


async def serve(port: int) -> int:
    app = web.Application()
    app.router.add_get("/.well-known/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, os.environ.get("LISTEN_IP") or None, port).start()
    print(f"ping: listening on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    print("ping: stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flynn-host component ping")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    args = p.parse_args(argv)
    return asyncio.run(serve(args.port))
