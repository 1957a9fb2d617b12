"""`flynn log`: an app's log from the controller (`GET /apps/:app/log`), printed as the 2015 CLI
printed it — one line per message,

    2015-12-13T09:46:40.123456Z app[web.flynn-3f656af6]: listening on 8080

the time in Go's `2006-01-02T15:04:05.000000Z07:00`, then the message's `source` (`app` for a
job's output; whatever the message says otherwise), process type and job id (either may be
empty: `app[.host-1234]`). `-r` prints the text alone; `-s` sends stderr messages to stderr
(they go to stdout otherwise); `-f` keeps printing new messages until interrupted.

A job id may also be given as the only argument (`flynn log <job>`, the form of the CLI before
`-j`): it means the same as `-j`.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any, TextIO

from flynn_cli.context import Context
from flynn_cli.output import CommandError, parse_time

LOG_USAGE = """
usage: flynn log [-f] [-j <id>] [-n <lines>] [-r] [-s] [-t <type>]
       flynn log [-f] [-n <lines>] [-r] [-s] [-t <type>] <job>

Stream log for an app.

Options:
	-f, --follow               stream new lines
	-j, --job=<id>             filter logs to a specific job ID
	-n, --number=<lines>       return at most n lines from the log buffer
	-r, --raw-output           output raw log messages with no prefix
	-s, --split-stderr         send stderr lines to stderr
	-t, --process-type=<type>  filter logs to a specific process type
"""

ZERO_TIME = "0001-01-01T00:00:00.000000Z"  # what Go prints for a message without a time


def log_time(value: Any) -> str:
    """A message's `timestamp` as Go formats `2006-01-02T15:04:05.000000Z07:00`: six digits
    of fraction (cut, not rounded), `Z` for UTC, otherwise the offset the time came with."""
    if not value:
        return ZERO_TIME
    t = parse_time(str(value))
    if t is None:
        return str(value)  # Go would stop at it; one odd message should not end a follow
    offset = int((t.utcoffset() or dt.timedelta(0)).total_seconds()) // 60
    if offset == 0:
        zone = "Z"
    else:
        hours, minutes = divmod(abs(offset), 60)
        zone = f"{'-' if offset < 0 else '+'}{hours:02d}:{minutes:02d}"
    return f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond:06d}{zone}"


def log_line(msg: dict[str, Any], raw: bool = False) -> str:
    """The line `flynn log` prints for a message (without its newline)."""
    text = str(msg.get("msg") or "")
    if raw:
        return text
    source, ptype, job = (str(msg.get(k) or "") for k in ("source", "process_type", "job_id"))
    return f"{log_time(msg.get('timestamp'))} {source}[{ptype}.{job}]: {text}"


def run_log(args: dict[str, Any], ctx: Context) -> None:
    lines = None
    if args["--number"] is not None:
        try:
            lines = int(args["--number"])
        except ValueError:
            raise CommandError(f'-n: "{args["--number"]}" is not a number of lines') from None
    out, err = sys.stdout, sys.stderr
    for f in (out, err):
        # a message is whatever a job wrote: print it even if the terminal cannot show it all
        if hasattr(f, "reconfigure"):
            f.reconfigure(errors="backslashreplace")
    errors_to = err if args["--split-stderr"] else out
    raw = bool(args["--raw-output"])
    app = ctx.app()
    with ctx.client.app_log(
        app,
        follow=bool(args["--follow"]),
        job_id=args["--job"] or args["<job>"] or "",
        lines=lines,
        process_type=args["--process-type"],
    ) as stream:
        for batch in stream.batches():
            for msg in batch:
                to: TextIO = errors_to if msg.get("stream") == "stderr" else out
                to.write(log_line(msg, raw) + "\n")
            out.flush()
            err.flush()
