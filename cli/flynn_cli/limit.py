"""`flynn limit`: the resource limits (memory, open files) of an app's process types, shown
and changed by a new release, deployed."""

from __future__ import annotations

import re
from typing import Any

from flynn_controller.client import NotFound

from flynn_cli.context import Context
from flynn_cli.output import CommandError, TabWriter, go_quote, log
from flynn_cli.release import release_body

Args = dict[str, Any]

LIMIT_USAGE = """
usage: flynn limit [-t <proc>]
       flynn limit set <proc> <var>=<val>...

Manage app resource limits.

Options:
	-t, --process-type=<proc>  set or read limits for specified process type

Commands:
	With no arguments, shows a list of resource limits.

	set    sets value of one or more resource limits

Examples:

	$ flynn limit
	web:     max_fd=10000  memory=1GB
	worker:  max_fd=10000  memory=1GB

	$ flynn limit set web memory=512MB max_fd=12000
	Created release 5058ae7964f74c399a240bdd6e7d1bcb

	$ flynn limit
	web:     max_fd=12000  memory=512MB
	worker:  max_fd=10000  memory=1GB
"""

GIB = 1024**3
# the types `limit set` accepts, with the controller's defaults (request = limit)
DEFAULTS = {"memory": GIB, "max_fd": 10000}
BYTE_TYPES = ("memory",)

_SIZE = re.compile(r"^(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[bB]?$")
_UNITS = "kmgtp"


def parse_size(text: str, base: int) -> int:
    """Docker's `units.RAMInBytes` (base 1024) / `FromHumanSize` (base 1000): `512MB`,
    `1g`, `1.5 GB`, `12000`."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"invalid size: {text!r}")
    value = float(m.group(1))
    if m.group(2):
        value *= base ** (_UNITS.index(m.group(2).lower()) + 1)
    return int(value)


def parse_limit(typ: str, text: str) -> int:
    return parse_size(text, 1024 if typ in BYTE_TYPES else 1000)


def format_limit(typ: str, limit: int) -> str:
    """`1GB`, `512MB`, ... for byte limits (Go `%.4g` of the 1024-based size), else the
    number."""
    if typ not in BYTE_TYPES:
        return str(limit)
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    size = float(limit)
    i = 0
    while size >= 1024 and i < len(units) - 1:
        size /= 1024
        i += 1
    return f"{size:.4g}{units[i]}"


def _format_limits(w: TabWriter, proc: str, resources: dict[str, Any] | None) -> None:
    limits = []
    for typ, spec in (resources or {}).items():
        limit = (spec or {}).get("limit")
        if isinstance(limit, int):
            limits.append(f"{typ}={format_limit(typ, limit)}")
    w.row(f"{proc}:", *sorted(limits))


def run_limit(args: Args, ctx: Context) -> None:
    if args["set"]:
        run_limit_set(args, ctx)
        return
    app = ctx.app()
    try:
        release = ctx.client.app_release(app)
    except NotFound:
        return
    processes = release.get("processes") or {}
    with TabWriter() as w:
        proc = args["--process-type"]
        if proc:
            if proc not in processes:
                raise CommandError(f"unknown process type {go_quote(proc)}")
            _format_limits(w, proc, (processes[proc] or {}).get("resources"))
            return
        for name, ptype in sorted(processes.items()):
            _format_limits(w, name, (ptype or {}).get("resources"))


def run_limit_set(args: Args, ctx: Context) -> None:
    app = ctx.app()
    client = ctx.client
    proc = args["<proc>"]
    try:
        release = client.app_release(app)
    except NotFound:
        release = {}
    processes = release.get("processes") or {}
    release["processes"] = processes
    if proc not in processes:
        log(f"Warning: {go_quote(proc)} is not an existing process type, setting anyway")
    ptype = dict(processes.get(proc) or {})
    resources = ptype.get("resources")
    if not resources:
        resources = {t: {"request": v, "limit": v} for t, v in DEFAULTS.items()}
    changes = {}
    for item in args["<var>=<val>"]:
        typ, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"invalid resource limit: {go_quote(item)}")
        if typ not in DEFAULTS:
            raise CommandError(f"invalid resource limit type: [{go_quote(typ)} {go_quote(value)}]")
        try:
            changes[typ] = parse_limit(typ, value)
        except ValueError:
            raise CommandError(f"invalid resource limit value: {go_quote(value)}") from None
    for typ, limit in changes.items():
        resources[typ] = {"limit": limit, "request": None}
    ptype["resources"] = resources
    processes[proc] = ptype
    release.pop("id", None)
    created = client.create_release(release_body(release))
    client.deploy_app_release(app, created["id"])
    print(f"Created release {created['id']}")
