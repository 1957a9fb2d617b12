"""`flynn pg psql|dump|restore`: the app's Postgres database through a job of the app that
runs the postgres app's own release (whose image has psql, pg_dump and pg_restore) with the
app's `PG*` variables. A dump is streamed from the job's stdout, a restore into its stdin;
both show a progress bar (bytes and rate) on a terminal's stderr unless `-q`."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, BinaryIO

from flynn_controller.client import NotFound

from flynn_cli import attach
from flynn_cli.context import Context
from flynn_cli.output import CommandError, Exit

PG_USAGE = """
usage: flynn pg psql [--] [<argument>...]
       flynn pg dump [-q] [-f <file>]
       flynn pg restore [-q] [-f <file>]

Options:
	-f, --file=<file>  name of the dump file
	-q, --quiet        do not show progress

Commands:
	psql     open a psql console on the app's database; arguments go to psql
	dump     dump the database (to stdout when no file is given)
	restore  restore a dump into the database (from stdin when no file is given)

Examples:

	$ flynn pg psql -- -c "CREATE EXTENSION hstore"
	$ flynn pg dump -f db.dump
	$ flynn pg restore -f db.dump
"""

PG_VARS = ("PGHOST", "PGUSER", "PGPASSWORD", "PGDATABASE")
LESS = "--ignore-case --LONG-PROMPT --SILENT --tabs=4 --quit-if-one-screen --no-init --quit-at-eof"


def run_pg(args: dict[str, Any], ctx: Context) -> None:
    app = ctx.app()
    client = ctx.client
    try:
        env: dict[str, str] = dict(client.app_release(app).get("env") or {})
    except NotFound:
        env = {}
    service = env.get("FLYNN_POSTGRES", "")
    if not service:
        raise CommandError(
            "No postgres database found. Provision one with `flynn resource add postgres`"
        )
    for name in PG_VARS:
        if not env.get(name):
            raise CommandError(f"missing {name} in app environment")
    try:
        pg_release = client.app_release(service)["id"]
    except NotFound:
        raise CommandError(f"the postgres app {service!r} has no release") from None
    new_job: dict[str, Any] = {
        "release": pg_release,
        "release_env": False,
        "disable_log": True,
        "env": {name: env[name] for name in PG_VARS},
    }
    if args["psql"]:
        status = _psql(ctx, app, new_job, args["<argument>"])
    elif args["dump"]:
        status = _dump(ctx, app, new_job, args["--file"], args["--quiet"])
    else:
        status = _restore(ctx, app, new_job, args["--file"], args["--quiet"])
    if status != 0:
        raise Exit(status)


def _psql(ctx: Context, app: str, new_job: dict[str, Any], arguments: list[str]) -> int:
    new_job["entrypoint"] = ["psql"]
    if arguments:
        new_job["cmd"] = list(arguments)
    new_job["env"].update(PAGER="less", LESS=LESS)
    if attach.is_terminal():
        columns, lines = attach.terminal_size()
        new_job.update(tty=True, tty_columns=columns, tty_lines=lines)
        new_job["env"].update(
            COLUMNS=str(columns), LINES=str(lines), TERM=os.environ.get("TERM", "")
        )
    return attach.run_attached(ctx.client, app, new_job)


def _dump(ctx: Context, app: str, new_job: dict[str, Any], path: str | None, quiet: bool) -> int:
    new_job["entrypoint"] = ["pg_dump"]
    new_job["cmd"] = ["--format=custom", "--no-owner", "--no-acl"]
    out: BinaryIO = open(path, "wb") if path else sys.stdout.buffer  # noqa: SIM115
    try:
        bar = Progress(None) if not quiet and sys.stderr.isatty() else None
        sink: BinaryIO = _Counted(out, bar) if bar else out  # type: ignore[assignment]
        status = attach.run_attached(ctx.client, app, new_job, attach.Stdio(read=None, stdout=sink))
        if bar:
            bar.finish()
        return status
    finally:
        if path:
            out.close()


def _restore(ctx: Context, app: str, new_job: dict[str, Any], path: str | None, quiet: bool) -> int:
    env = new_job["env"]
    new_job["entrypoint"] = ["pg_restore"]
    new_job["cmd"] = ["-d", env["PGDATABASE"], "--clean", "--if-exists", "--no-owner", "--no-acl"]
    src: BinaryIO = open(path, "rb") if path else sys.stdin.buffer  # noqa: SIM115
    try:
        total = os.fstat(src.fileno()).st_size if path else None
        bar = Progress(total) if not quiet and sys.stderr.isatty() else None

        def read(n: int) -> bytes:
            data = src.read1(n) if hasattr(src, "read1") else src.read(n)
            if bar:
                bar.add(len(data))
            return data

        status = attach.run_attached(ctx.client, app, new_job, attach.Stdio(read=read))
        if bar:
            bar.finish()
    finally:
        if path:
            src.close()
    # pg_restore exits 1 for the errors it ignored (objects --clean found missing)
    return 0 if status == 1 else status


class _Counted:
    """A binary output that counts what is written through it into a progress bar."""

    def __init__(self, out: BinaryIO, bar: Progress) -> None:
        self.out = out
        self.bar = bar

    def write(self, data: bytes) -> int:
        self.bar.add(len(data))
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


class Progress:
    """A one-line progress bar on stderr: `12.50 MB 3.10 MB/s`, or with a known total
    `12.50 MB / 50.00 MB [=====>     ]  25.00 % 3.10 MB/s`; redrawn at most 5 times a second."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.drawn = 0.0
        self.shown = 0  # length of the line on screen, to blank what a shorter one leaves

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.drawn >= 0.2:
            self.drawn = now
            self._draw(now)

    def finish(self) -> None:
        self._draw(time.monotonic())
        sys.stderr.write("\n")
        sys.stderr.flush()

    def line(self, now: float, width: int = 80) -> str:
        rate = self.done / max(now - self.start, 1e-3)
        speed = f"{size(int(rate))}/s"
        if self.total is None:
            return f"{size(self.done)} {speed}"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        head = f"{size(self.done)} / {size(self.total)} "
        tail = f" {percent:6.2f} % {speed}"
        room = max(width - len(head) - len(tail) - 2, 10)
        filled = min(room, int(room * percent / 100))
        bar = "=" * filled + (">" if filled < room else "")
        return f"{head}[{bar.ljust(room)}]{tail}"

    def _draw(self, now: float) -> None:
        try:
            width = os.get_terminal_size(2).columns
        except OSError:
            width = 80
        text = self.line(now, width - 1)
        sys.stderr.write("\r" + text.ljust(self.shown))
        sys.stderr.flush()
        self.shown = len(text)


def size(n: int) -> str:
    """Bytes as `512 B`, `1.50 KB`, `60.34 MB` (units of 1024)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1024
        if value < 1024 or unit == "TB":
            break
    return f"{value:.2f} {unit}"
