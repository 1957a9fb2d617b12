"""`flynn run`: a one-off job from the app's release (or `-r`'s), attached to this terminal by
default (a TTY when stdin and stdout are terminals), or detached with `-d`, which prints the
new job's id."""

from __future__ import annotations

import os
from typing import Any

from flynn_controller.client import NotFound

from flynn_cli import attach
from flynn_cli.context import Context
from flynn_cli.output import CommandError, Exit, log

RUN_USAGE = """
usage: flynn run [-d] [-r <release>] [-e <entrypoint>] [-l] [--] <command> [<argument>...]

Run a job.

Options:
	-d, --detached     run the job without attaching its stdio (its output goes to the log)
	-r <release>       the release to run (default: the app's current release)
	-e <entrypoint>    replace the entrypoint of the release's image
	-l, --enable-log   send the job's output to the log as well
"""


def run_run(args: dict[str, Any], ctx: Context) -> None:
    app = ctx.app()
    release_id = args["-r"]
    if not release_id:
        try:
            release_id = ctx.client.app_release(app)["id"]
        except NotFound:
            raise CommandError("No app release, specify a release with -release") from None
    detached = bool(args["--detached"])
    new_job: dict[str, Any] = {
        "release": release_id,
        "release_env": True,
        "cmd": [args["<command>"], *args["<argument>"]],
    }
    if args["-e"]:
        new_job["entrypoint"] = [args["-e"]]
    if detached:
        job = ctx.client.run_job_detached(app, new_job)
        log(str(job.get("id", "")))
        return
    if not args["--enable-log"]:
        new_job["disable_log"] = True
    if attach.is_terminal():
        columns, lines = attach.terminal_size()
        new_job.update(tty=True, tty_columns=columns, tty_lines=lines)
        new_job["env"] = {
            "COLUMNS": str(columns),
            "LINES": str(lines),
            "TERM": os.environ.get("TERM", ""),
        }
    status = attach.run_attached(ctx.client, app, new_job)
    if status != 0:
        raise Exit(status)
