"""The operator's job commands: `ps`, `log`, `inspect`, `stop`, `signal`, `image`, `plugins`
(`run` is `flynn_host.cli.run`)."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flynn_host.cli.usage import Parser, UsageError
from flynn_host.client import HostClient
from flynn_host.runtime import attach
from flynn_host.types import parse_signal


def human_duration(seconds: float) -> str:
    """Docker's units.HumanDuration, which Flynn's `ps` prints ("About a minute", ...)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds // 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def parse_time(value: str) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def ago(value: str) -> str:
    t = parse_time(value)
    if t is None:
        return ""
    return human_duration((datetime.now(UTC) - t).total_seconds()) + " ago"


def table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell plus two spaces (Go's tabwriter, as Flynn used)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# --- ps ---------------------------------------------------------------------------------------

PS_USAGE = """\
usage: flynn-host ps [-a|--all] [-q|--quiet]

List jobs on this host.

options:
  -a, --all     show all jobs (default only shows running jobs)
  -q, --quiet   only show job IDs
"""


def cmd_ps(argv: list[str]) -> int:
    p = Parser(PS_USAGE)
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse(argv)
    jobs = list(HostClient().list_jobs().values())
    jobs.sort(key=lambda j: j.get("created_at", ""))
    if not args.all:
        jobs = [j for j in jobs if j["status"] in ("starting", "running")]
    if args.quiet:
        for j in jobs:
            print(j["job"]["id"])
        return 0
    rows = [["ID", "STATE", "STARTED", "CONTROLLER APP", "CONTROLLER TYPE"]]
    for j in jobs:
        meta = j["job"].get("metadata") or {}
        started = j.get("started_at") or ""
        rows.append(
            [
                j["job"]["id"],
                j["status"],
                ago(started) or ago(j.get("created_at", "")),
                meta.get("flynn-controller.app_name", ""),
                meta.get("flynn-controller.type", ""),
            ]
        )
    print(table(rows))
    return 0


# --- inspect ----------------------------------------------------------------------------------

INSPECT_USAGE = """\
usage: flynn-host inspect [options] ID

Get low-level information about a job.

options:
  --omit-env          don't include the job environment
  --redact-env ENVS   don't show the values of these comma separated environment variables
"""


def go_time(value: str) -> str:
    """Go's time.Time String() form, which Flynn's inspect prints."""
    t = parse_time(value)
    if t is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    return t.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC")


def cmd_inspect(argv: list[str]) -> int:
    p = Parser(INSPECT_USAGE)
    p.add_argument("--omit-env", action="store_true")
    p.add_argument("--redact-env", default="")
    p.add_argument("ID")
    args = p.parse(argv)
    j = HostClient().get_job(args.ID)
    job = j["job"]
    rows = [
        ["ID", job["id"]],
        ["Status", j["status"]],
        ["CreatedAt", go_time(j.get("created_at", ""))],
        ["StartedAt", go_time(j.get("started_at", ""))],
        ["EndedAt", go_time(j.get("ended_at", ""))],
        ["ExitStatus", str(j.get("exit_status") if j.get("exit_status") is not None else "")],
        ["IP Address", j.get("internal_ip") or ""],
        ["Args", " ".join(job["config"].get("args") or [])],
    ]
    if j.get("error"):
        rows.append(["Error", j["error"]])
    for k, v in sorted((job.get("metadata") or {}).items()):
        rows.append([k, v])
    if not args.omit_env:
        redact = {e.strip() for e in args.redact_env.split(",") if e.strip()}
        for k, v in sorted((job["config"].get("env") or {}).items()):
            rows.append([f"ENV[{k}]", "***" if k in redact else v])
    print(table(rows))
    return 0


# --- stop / signal ----------------------------------------------------------------------------


def cmd_stop(argv: list[str]) -> int:
    p = Parser("usage: flynn-host stop ID...\n\nStop running jobs.\n")
    p.add_argument("ID", nargs="+")
    args = p.parse(argv)
    client = HostClient()
    for job_id in args.ID:
        client.stop_job(job_id)
    return 0


def cmd_signal(argv: list[str]) -> int:
    p = Parser("usage: flynn-host signal ID SIGNAL\n\nSend a signal to a running job.\n")
    p.add_argument("ID")
    p.add_argument("SIGNAL")
    args = p.parse(argv)
    HostClient().signal_job(args.ID, parse_signal(args.SIGNAL))
    return 0


# --- log --------------------------------------------------------------------------------------

LOG_USAGE = """\
usage: flynn-host log [-f|--follow] [--lines=<number>] [--split-stderr] ID

Get the logs of a job.

options:
  -f, --follow         follow log output
  --lines=<number>     only show the last N lines
  --split-stderr       send stderr lines to stderr
"""


async def _print_attach(url: str, request: dict[str, Any], split_stderr: bool) -> int:
    """Print a job's log frames; 1 if the host reported an error, else 0 (whatever the job's
    own exit status: the log was shown). A refused attach (no such job) is raised, for
    `main` to report like every other command's errors."""
    reader, writer = await attach.attach_host(url, request)
    try:
        while (frame := await attach.read_frame(reader)) is not None:
            if frame.kind == "data" and frame.data:
                out = sys.stderr if frame.stream == 2 and split_stderr else sys.stdout
                out.buffer.write(frame.data)
                out.flush()
            elif frame.kind == "exit":
                break
            elif frame.kind == "error":
                print(f"error: {frame.message}", file=sys.stderr)
                return 1
    finally:
        writer.close()
    return 0


def cmd_log(argv: list[str]) -> int:
    p = Parser(LOG_USAGE)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--lines", type=int, default=None)
    p.add_argument("--split-stderr", action="store_true")
    p.add_argument("--init", action="store_true")
    p.add_argument("ID")
    args = p.parse(argv)
    flags = attach.ATTACH_LOGS | attach.ATTACH_STDOUT | attach.ATTACH_STDERR
    if args.follow:
        flags |= attach.ATTACH_STREAM
    request = {"job_id": args.ID, "flags": flags, "lines": args.lines}
    return asyncio.run(_print_attach(HostClient().url, request, args.split_stderr))


# --- images -------------------------------------------------------------------------------

IMAGE_USAGE = """\
usage: flynn-host image import [--name=<name>] <manifest>
       flynn-host image list
       flynn-host image rm <name>...
       flynn-host image gc

Manage the images this host has: import one from a Flynn image manifest (a path, file:// or
http(s):// URL; its layers are read from ../layers/<id>.squashfs beside it), list them, forget
them, and delete cached layers no image or job uses.
"""


def cmd_image(argv: list[str]) -> int:
    p = Parser(IMAGE_USAGE)
    p.add_argument("action", choices=["import", "list", "rm", "gc"])
    p.add_argument("--name", default=None)
    p.add_argument("args", nargs="*")
    args = p.parse(argv, intermixed=True)
    client = HostClient()
    if args.action == "import":
        if len(args.args) != 1:
            raise UsageError(f"image import takes one manifest\n\n{IMAGE_USAGE}")
        ref = args.args[0]
        if "://" not in ref:
            ref = Path(ref).absolute().as_uri()  # the daemon runs elsewhere: send a full URL
        print(f"importing {ref} (fetching and verifying its layers) ...", file=sys.stderr)
        image = client.request("POST", "/host/images", {"manifest_url": ref, "name": args.name})
        print(f"imported {image['name']}: id {image['id'][:16]}..., "
              f"{len(image['mountspecs'])} layers, {image['size'] / 1e6:.1f} MB")  # fmt: skip
    elif args.action == "list":
        rows = [["NAME", "ID", "LAYERS", "SIZE", "IMPORTED"]]
        for image in client.request("GET", "/host/images"):
            rows.append([image["name"], image["id"][:16], str(image["layers"]),
                         f"{image['size'] / 1e6:.1f} MB", ago(image["imported_at"])])  # fmt: skip
        print(table(rows))
    elif args.action == "rm":
        if not args.args:
            raise UsageError(f"image rm needs a name\n\n{IMAGE_USAGE}")
        for name in args.args:
            client.request("DELETE", f"/host/images/{name}")
    else:
        removed = client.request("POST", "/host/images/gc", {})["removed"]
        print(f"removed {len(removed)} unused layers")
    return 0


# --- plugins ----------------------------------------------------------------------------------


def cmd_plugins(argv: list[str]) -> int:
    p = Parser("usage: flynn-host plugins [--json]\n\nList the plugins the daemon loaded.\n")
    p.add_argument("--json", action="store_true")
    args = p.parse(argv)
    plugins = HostClient().plugins()
    if args.json:
        import json

        print(json.dumps(plugins, indent=2))
        return 0
    rows = [["NAME", "VERSION", "SOURCE", "HOOKS"]]
    for plugin in plugins:
        rows.append(
            [plugin["name"], plugin["version"], plugin["source"], ", ".join(plugin["hooks"])]
        )
    print(table(rows))
    return 0
