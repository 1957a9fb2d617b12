"""`flynn-host component gitreceive`: one gitreceive process (server.py) on `$PORT` (default
5000). Its configuration is Flynn's env: `CONTROLLER_KEY` (the password pushers give, and how
the receiver talks to the controller at `CONTROLLER_URL`, default
`http://controller.discoverd`), `SLUGBUILDER_IMAGE_URI` and `SLUGRUNNER_IMAGE_URI` (the
images' manifest URLs on the hosts), `BLOBSTORE_URL` (default `http://blobstore.discoverd`)
and the `PG*` variables of its postgres resource (the lock that serialises pushes to an app;
without a database the lock is this process's only). In a cluster it registers itself in
discoverd service `gitreceive`; SIGTERM leaves discoverd first, then stops serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web

from flynn_gitreceive.repos import MAX_PUSH, PushLocks, RepoStore
from flynn_gitreceive.server import Config, hook_command, make_app
from flynn_gitreceive.types import BLOBSTORE_URL

log = logging.getLogger("flynn_gitreceive")

SERVICE = "gitreceive"
REGISTER_RETRY = 2.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flynn-host component gitreceive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 5000))
    p.add_argument("--listen", default=os.environ.get("LISTEN_IP") or "0.0.0.0")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    from flynn_controller.client import Client

    env = os.environ
    key = env.get("CONTROLLER_KEY") or ""
    if not key:
        print("gitreceive: CONTROLLER_KEY must be set", file=sys.stderr)
        return 2
    controller_url = env.get("CONTROLLER_URL") or "http://controller.discoverd"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    repos = RepoStore(
        env.get("BLOBSTORE_URL") or BLOBSTORE_URL,
        max_push=int(env.get("GITRECEIVE_MAX_PUSH") or MAX_PUSH),
    )
    config = Config(
        keys=key.split(","),
        controller=Client(controller_url, key.split(",")[0]),
        repos=repos,
        locks=PushLocks(
            env.get("DATABASE_URL"), bool(env.get("DATABASE_URL") or env.get("PGHOST"))
        ),
        hook_command=hook_command(),
        hook_env={"CONTROLLER_URL": controller_url},
    )
    runner = web.AppRunner(make_app(config), shutdown_timeout=30.0)
    await runner.setup()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(repos.close)
        stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, args.listen, args.port).start()
        except OSError as exc:
            print(f"gitreceive: cannot serve on {args.listen}:{args.port}: {exc}", file=sys.stderr)
            return 1
        from flynn_discoverd.client import registered_in_cluster

        await stack.enter_async_context(registered_in_cluster(SERVICE, args.port, REGISTER_RETRY))
        print(f"gitreceive: serving on {args.listen}:{args.port}", flush=True)
        await stop.wait()
        log.info("stopping")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(run(parse_args(argv)))
