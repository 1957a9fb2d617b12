"""`flynn-host run`: run a job from an image on a host and attach to it (the terminal in raw mode
for a TTY, signals passed on, the job's exit status as the command's)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import termios
import threading
import tty
import uuid
from pathlib import Path
from typing import Any

from flynn_host.cli.usage import Parser
from flynn_host.client import HostAPIError, HostClient
from flynn_host.runtime import attach, images
from flynn_host.types import parse_limits

RUN_USAGE = """\
usage: flynn-host run [options] [--] <artifact> <command> [<argument>...]

Run a job on a host. <artifact> is an image name (from $FLYNN_IMAGES, default
/var/lib/flynn/images), a path to a Flynn image manifest, or a file:// URL of one.

options:
  --host=<host>          the host to run the job on (ip[:port]; default the local host)
  --bind=<mountspecs>    bind mount directories: HOSTPATH:CONTAINERPATH[:rw],...
  --volume=<path>        create a data volume and mount it at <path>
  --limits=<limits>      resource limits, e.g. memory=32M,max_fd=100,temp_disk=200MB
  --workdir=<dir>        working directory
  --hostnet              use the host network
"""


def resolve_image(client: HostClient, ref: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An image's manifest and job mountspecs: an image the host imported (by name), else a
    manifest file (a path, a file:// URL, or a name in $FLYNN_IMAGES)."""
    if re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", ref) and not ref.endswith(".json"):
        try:
            image = client.request("GET", f"/host/images/{ref}")
            return image["manifest"], image["mountspecs"]
        except HostAPIError as exc:
            if exc.status != 404:
                raise
    manifest, base = images.load_manifest(ref, images.images_dir())
    # an image directory keeps its layers beside its manifests: <images>/layers/<id>.squashfs
    layers_dir = Path(base.removeprefix("file://")).parent / "layers"
    template = f"file://{layers_dir}/{{id}}.squashfs"
    return manifest, images.mountspecs_for(manifest, template)


def build_run_job(args: Any, host_id: str, is_tty: bool, client: HostClient) -> dict[str, Any]:
    manifest, mountspecs = resolve_image(client, args.artifact)
    entry = images.entrypoint(manifest)
    env = dict(entry.get("env") or {})
    if is_tty:
        env["TERM"] = os.environ.get("TERM", "xterm")
    config: dict[str, Any] = {
        "args": [args.command, *args.argument],
        "env": env,
        "tty": is_tty,
        "stdin": True,
        "working_dir": args.workdir or entry.get("cwd") or "/",
        "host_network": bool(args.hostnet),
        "mounts": [],
        "volumes": [],
    }
    for item in filter(None, (args.bind or "").split(",")):
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("rw", "ro")):
            raise ValueError(f"--bind {item!r}: expected HOSTPATH:CONTAINERPATH[:rw]")
        config["mounts"].append(
            {"location": parts[0], "target": parts[1], "writeable": parts[2:] == ["rw"]}
        )
    job = {
        "id": f"{host_id}-{uuid.uuid4().hex}",
        "mountspecs": mountspecs,
        "config": config,
        "resources": parse_limits(args.limits) if args.limits else {},
    }
    if config["mounts"] or config["host_network"]:
        # the host only lets system jobs see its files or its network: the operator's own
        # command is one
        job["partition"] = "system"
    return job


class _Terminal:
    """Raw mode for the local terminal while a TTY job runs; restored whatever happens."""

    def __init__(self) -> None:
        self.saved = termios.tcgetattr(0)

    def __enter__(self) -> _Terminal:
        # TCSANOW, not setraw's default TCSAFLUSH: that discards input not yet read, which
        # here is whatever the user typed while the job was starting
        tty.setraw(0, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        termios.tcsetattr(0, termios.TCSADRAIN, self.saved)


async def _run_attached(url: str, job_id: str, is_tty: bool) -> int:
    loop = asyncio.get_running_loop()
    height, width = (0, 0)
    if is_tty:
        size = os.get_terminal_size(0)
        height, width = size.lines, size.columns
    flags = (
        attach.ATTACH_STDOUT | attach.ATTACH_STDERR | attach.ATTACH_STDIN
        | attach.ATTACH_LOGS | attach.ATTACH_STREAM
    )  # fmt: skip
    request = {"job_id": job_id, "flags": flags, "height": height, "width": width}
    reader, writer = await attach.attach_host(url, request)

    def send(frame: bytes) -> None:
        if not writer.is_closing():
            writer.write(frame)

    def pump_stdin() -> None:
        # a thread: stdin may be a file, a pipe or a terminal, which asyncio reads differently
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(send, attach.data_frame(0, data))
            if not data:
                return

    threading.Thread(target=pump_stdin, daemon=True).start()
    if is_tty:

        def on_winch() -> None:
            size = os.get_terminal_size(0)
            send(attach.resize_frame(size.lines, size.columns))

        loop.add_signal_handler(signal.SIGWINCH, on_winch)
    else:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, send, attach.signal_frame(sig))
    status = 1
    while (frame := await attach.read_frame(reader)) is not None:
        if frame.kind == "data" and frame.data:
            out = sys.stderr if frame.stream == 2 else sys.stdout
            out.buffer.write(frame.data)
            out.flush()
        elif frame.kind == "exit":
            status = frame.status or 0
            break
        elif frame.kind == "error":
            print(f"error: {frame.message}", file=sys.stderr)
            break
    writer.close()
    return status


def cmd_run(argv: list[str]) -> int:
    p = Parser(RUN_USAGE)
    p.add_argument("--host", default=None)
    p.add_argument("--bind", default=None)
    p.add_argument("--volume", default=None)
    p.add_argument("--limits", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--hostnet", action="store_true")
    p.add_argument("artifact")
    p.add_argument("command")
    p.add_argument("argument", nargs=argparse.REMAINDER)
    args = p.parse(argv)
    client = HostClient(args.host)
    host_id = client.status()["id"]
    is_tty = os.isatty(0) and os.isatty(1)
    job = build_run_job(args, host_id, is_tty, client)
    if args.volume:
        vol = client.request("POST", "/storage/providers/default/volumes", {})
        job["config"]["volumes"].append(
            # a volume only this run can name: it goes when the job ends
            {"target": args.volume, "volume": vol["id"], "writeable": True, "delete_on_stop": True}
        )
    client.add_job(job)
    if is_tty:
        with _Terminal():
            return asyncio.run(_run_attached(client.url, job["id"], True))
    return asyncio.run(_run_attached(client.url, job["id"], False))
