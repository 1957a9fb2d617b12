"""The package registries, and only they, for a development cluster's builds.

A development cluster's hosts live in network namespaces with no way out of the machine:
tests talk only to addresses they made. Builds are the exception the product needs: npm and pip
fetch dependencies from the npm registry and PyPI. `script/cluster up` therefore runs this
small HTTPS proxy in the root namespace, on the cluster bridge's address, and bootstrap hands
it to gitreceive as `BUILD_HTTPS_PROXY`, which puts it in each build's environment (as an
operator behind a corporate proxy would). It answers `CONNECT <host>:443` for the registries'
host names only and refuses everything else with 403, so a build can reach nothing more.

    python -m flynn_host.dev.registry_proxy --listen 10.201.3.1:3128 --log proxy.log
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

log = logging.getLogger("registry_proxy")

# npm's registry and PyPI (index and files): what the buildpacks download from
REGISTRIES = ("registry.npmjs.org", "pypi.org", "files.pythonhosted.org")
PORT = 3128
HEAD_LIMIT = 8192
CONNECT_TIMEOUT = 30.0
CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, allowed: tuple[str, ...]
) -> None:
    peer = writer.get_extra_info("peername")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        writer.close()
        return
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, _, rest = line.partition(" ")
    target = rest.split(" ", 1)[0]
    host, _, port = target.rpartition(":")
    if method != "CONNECT" or port != "443" or host.lower() not in allowed:
        log.info("%s: refused %s", peer, line)
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        return
    try:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(host, 443), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        log.info("%s: %s unreachable: %s", peer, target, exc)
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        return
    log.info("%s: CONNECT %s", peer, target)
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    # a tunnel carries TLS, which says itself when it is done: the first side to close ends
    # both, rather than leaving the other open until the registry's idle timeout
    pipes = {
        asyncio.create_task(_pipe(reader, up_writer)),
        asyncio.create_task(_pipe(up_reader, writer)),
    }
    _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for w in (writer, up_writer):
        w.close()


async def serve(host: str, port: int, allowed: tuple[str, ...]) -> None:
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, allowed), host, port, limit=HEAD_LIMIT
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving on %s:%d for %s", host, port, ", ".join(allowed))
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--listen", required=True, help="ip:port")
    p.add_argument("--allow", default=",".join(REGISTRIES), help="host names, comma-separated")
    p.add_argument("--log", help="log file (default stderr)")
    args = p.parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(message)s")  # fmt: skip
    host, _, port = args.listen.rpartition(":")
    allowed = tuple(h.strip().lower() for h in args.allow.split(",") if h.strip())
    try:
        asyncio.run(serve(host, int(port), allowed))
    except OSError as exc:
        print(f"registry_proxy: cannot serve on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
