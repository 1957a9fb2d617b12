"""`flynn-host component logaggregator`: the HTTP API on `$PORT_0` (default 5000) and the syslog
listener on `$PORT_1` (default 3000), both on `$LISTEN_IP` (default 0.0.0.0).

In a cluster (`DISCOVERD` and `EXTERNAL_IP` set) it registers itself in discoverd service
`$SERVICE_NAME` (default `logaggregator`) with its syslog address, `$EXTERNAL_IP:$PORT_1`, and
its API port in the instance meta `api_port`: that is what hosts ship to, and where they ask
for their cursors. Before serving, an instance that is not the first loads `GET /snapshot`
from the service's leader (the oldest instance), at the leader's IP and this instance's API
port — every instance of the app has the same ports, as in Flynn. `LOGAGGREGATOR_LEADER_URL`
names the leader's API directly instead (tests, or a manual copy).
`LOGAGGREGATOR_BUFFER_SIZE` is the messages kept per app (default 10,000).
SIGTERM leaves discoverd, ends the followers' streams and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from aiohttp import web

from flynn_logaggregator.buffer import Aggregator
from flynn_logaggregator.client import Client
from flynn_logaggregator.server import SyslogProtocol, make_app
from flynn_logaggregator.types import (
    BUFFER_BYTES,
    BUFFER_MESSAGES,
    DEFAULT_API_PORT,
    DEFAULT_SYSLOG_PORT,
    SERVICE,
)

log = logging.getLogger("flynn_logaggregator")

REGISTER_RETRY = 2.0
LEADER_TIMEOUT = 10.0
SNAPSHOT_TIMEOUT = 120.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="flynn-host component logaggregator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--api-port", type=int, default=int(env.get("PORT_0") or DEFAULT_API_PORT))
    p.add_argument("--syslog-port", type=int, default=int(env.get("PORT_1") or DEFAULT_SYSLOG_PORT))
    p.add_argument("--listen", default=env.get("LISTEN_IP") or "0.0.0.0")
    p.add_argument("--leader-url", default=env.get("LOGAGGREGATOR_LEADER_URL") or "")
    p.add_argument(
        "--buffer-size", type=int, default=int(env.get("LOGAGGREGATOR_BUFFER_SIZE") or 0)
    )
    p.add_argument("--service", default=env.get("SERVICE_NAME") or SERVICE)
    return p.parse_args(argv)


async def leader_url(args: argparse.Namespace) -> str:
    """The API URL of another instance to copy from, or "" when this one is the first."""
    if args.leader_url:
        return str(args.leader_url)
    env = os.environ
    if env.get("DISCOVERD") in (None, "", "none") or not env.get("EXTERNAL_IP"):
        return ""
    from flynn_discoverd.client import Client as Discoverd

    own = f"{env['EXTERNAL_IP']}:{args.syslog_port}"
    try:
        async with Discoverd() as d:
            leader = await asyncio.wait_for(d.leader(args.service), LEADER_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - no discoverd yet: start empty, as the first
        log.warning("cannot ask discoverd for the %s leader, starting empty: %s", args.service, exc)
        return ""
    if leader is None or leader.addr == own:
        return ""
    host = leader.addr.rsplit(":", 1)[0]
    return f"http://{host}:{args.api_port}"


async def load_snapshot(agg: Aggregator, url: str) -> None:
    started = time.monotonic()
    try:
        async with Client(url) as c:
            cursors, msgs = await asyncio.wait_for(c.snapshot(), SNAPSHOT_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the leader may be going away: start empty
        log.warning("loading a snapshot from %s failed, starting empty: %s", url, exc)
        return
    n = agg.restore(cursors, msgs)
    log.info("loaded %d messages of %d hosts from %s in %.2fs", n, len(cursors), url,
             time.monotonic() - started)  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agg = Aggregator(args.buffer_size or BUFFER_MESSAGES, BUFFER_BYTES)
    url = await leader_url(args)
    if url:
        await load_snapshot(agg, url)
    # a follower whose client went away is cancelled at once (its handler unfollows), rather
    # than waiting for the next message of its app to find the connection closed
    runner = web.AppRunner(make_app(agg), shutdown_timeout=5.0, handler_cancellation=True)
    await runner.setup()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        try:
            syslog = await loop.create_server(
                lambda: SyslogProtocol(agg), args.listen, args.syslog_port
            )
            await web.TCPSite(runner, args.listen, args.api_port).start()
        except OSError as exc:
            print(f"logaggregator: cannot listen on {args.listen}: {exc}", file=sys.stderr)
            return 1
        stack.callback(syslog.close)
        from flynn_discoverd.client import registered_in_cluster

        # hosts ship to the registered syslog address and ask the API port beside it for
        # their cursors (docs/logmux.md)
        meta = {"api_port": str(args.api_port)}
        await stack.enter_async_context(
            registered_in_cluster(args.service, args.syslog_port, REGISTER_RETRY, meta=meta)
        )
        print(f"logaggregator: API on {args.listen}:{args.api_port}, syslog on "
              f"{args.listen}:{args.syslog_port}", flush=True)  # fmt: skip
        await stop.wait()
        log.info("stopping (%d messages accepted, %d duplicates dropped)",
                 agg.accepted, agg.duplicates)  # fmt: skip
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(run(parse_args(argv)))
