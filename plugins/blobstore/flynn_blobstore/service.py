"""`flynn-host component blobstore [--dir DIR]`: one blobstore process.

It serves the blobstore API (`server`) on `$PORT` (default 5000) at `$LISTEN_IP` (default
0.0.0.0), keeping blobs in PostgreSQL large objects (`pgstore`: the database of its postgres
resource, `PG*` or `DATABASE_URL`; it waits for it and applies its migrations) or, with `--dir`,
in a directory (`dirstore`). In a cluster (`DISCOVERD` and `EXTERNAL_IP` set) it registers
itself in discoverd service `blobstore`, so `http://blobstore.discoverd` reaches it. SIGTERM
leaves discoverd first, then stops serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import asyncpg
from aiohttp import web

from flynn_blobstore.server import make_app
from flynn_blobstore.store import Store
from flynn_blobstore.types import SERVICE

log = logging.getLogger("flynn_blobstore")

DB_RETRY = 1.0
DB_WAIT = 300.0  # seconds a starting blobstore waits for its database
REGISTER_RETRY = 2.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="flynn-host component blobstore",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", "-s", default="",
                   help="keep blobs in this directory instead of PostgreSQL")  # fmt: skip
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 5000))
    p.add_argument("--listen", default=os.environ.get("LISTEN_IP") or "0.0.0.0")
    return p.parse_args(argv)


async def open_pg_store() -> Store:
    from flynn_blobstore.pgstore import PGStore

    deadline = asyncio.get_running_loop().time() + DB_WAIT
    while True:
        try:
            return await PGStore.connect()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("database not ready (%s); retrying", exc)
            await asyncio.sleep(DB_RETRY)


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.dir:
        from flynn_blobstore.dirstore import DirStore

        async def open_dir_store() -> Store:
            return DirStore(args.dir)

        app = make_app(open_dir_store)
    else:
        app = make_app(open_pg_store)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()  # opens the store (cleanup_ctx)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, args.listen, args.port).start()
        except OSError as exc:
            print(f"blobstore: cannot serve on {args.listen}:{args.port}: {exc}", file=sys.stderr)
            return 1
        from flynn_discoverd.client import registered_in_cluster

        await stack.enter_async_context(registered_in_cluster(SERVICE, args.port, REGISTER_RETRY))
        where = args.dir or "PostgreSQL"
        print(f"blobstore: serving on {args.listen}:{args.port} from {where}", flush=True)
        await stop.wait()
        log.info("stopping")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"blobstore: the store did not answer: {exc}", file=sys.stderr)
        return 1
