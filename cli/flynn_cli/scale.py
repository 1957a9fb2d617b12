"""`flynn ps`, `flynn kill` and `flynn scale`: an app's running jobs, stopping one, and how
many jobs of each process type a release should run.

`scale` changes a formation and then watches the app's `job` events until the jobs it asked
for have come up or gone down, as the 2015 CLI did (`flynn-2015-api.md` §5.1): the stream is
opened before the formation is written, so no event is missed; only events of the scaled
release count; `crashed` and `failed` count as `down`; it is done when every expected
(type, state) count is exactly reached, and gives up after `SCALE_TIMEOUT` seconds without an
event of the release (`$FLYNN_SCALE_TIMEOUT` overrides it, for tests).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from collections.abc import Callable
from typing import Any

from flynn_controller.client import Client, EventStream, NotFound

from flynn_cli.context import Context
from flynn_cli.output import CommandError, TabWriter, go_quote, log

Args = dict[str, Any]

PS_USAGE = """
usage: flynn ps

List flynn jobs.

Example:

	$ flynn ps
	ID                                         TYPE  RELEASE
	host-28a16c12-6136-4e06-93b1-2b014147de79  web   ace81d3d-93f5-4df3-b364-55f05cb908c3
"""

KILL_USAGE = """
usage: flynn kill <job>

Kill a job.
"""

SCALE_USAGE = """
usage: flynn scale [options] [<type>=<qty>...]

Scale changes the number of jobs for each process type in a release.

Ommitting the arguments will show the current scale.

Options:
	-n, --no-wait            don't wait for the scaling events to happen
	-r, --release=<release>  id of release to scale (defaults to current app release)
	-a, --all                show formations of all releases

Example:

	$ flynn scale
	web=4 worker=2

	$ flynn scale --all
	496d6e74-9db9-4cff-bcce-a3b44015907a (current)
	web=1 worker=2

	632cd907-85ab-4e53-90d0-84635650ec9a
	web=2

	$ flynn scale web=2 worker=5
	scaling web: 4=>2, worker: 2=>5

	02:28:34.333 ==> web flynn-3f656af6f1e44092aa7037046236b203 down
	02:28:34.466 ==> web flynn-ee83def0b8e4455793a43c8c70f5b34e down
	02:28:35.479 ==> worker flynn-84f70ca18c9641ef83a178a19db867a3 up
	02:28:36.508 ==> worker flynn-a3de8c326cc542aa89235e53ba304260 up
	02:28:37.601 ==> worker flynn-e24760c511af4733b01ed5b98aa54647 up

	scale completed in 3.944629056s
"""

SCALE_TIMEOUT = 20.0  # seconds without an event of the scaled release before giving up

# job states that mean the job is gone, whatever the host called it
DOWN_STATES = ("down", "crashed", "failed")

QUANTITY = re.compile(r"[+-]?[0-9]+")

# what scale waits for: process type -> job state -> number of events
JobEvents = dict[str, dict[str, int]]


# --------------------------------------------------------------------------------------------
# ps and kill


def run_ps(args: Args, ctx: Context) -> None:
    app = ctx.app()
    jobs = [j for j in ctx.client.job_list(app) if j.get("state") == "up"]
    rows = [(j.get("id", ""), j.get("type") or "run", j.get("release", "")) for j in jobs]
    rows.sort(key=lambda r: r[1])  # stable: same-type jobs keep the server's order
    with TabWriter() as w:
        w.row("ID", "TYPE", "RELEASE")
        for row in rows:
            w.row(*row)


def run_kill(args: Args, ctx: Context) -> None:
    app = ctx.app()
    job = args["<job>"]
    try:
        ctx.client.delete_job(app, job)
    except NotFound:
        raise CommandError(f"could not kill job {job}: no such job of app {app}") from None
    log(f"Job {job} killed.")


# --------------------------------------------------------------------------------------------
# scale


def run_scale(args: Args, ctx: Context) -> None:
    specs: list[str] = args["<type>=<qty>"]
    release_id: str = args["--release"] or ""
    if args["--all"]:
        if specs:
            raise CommandError("ERROR: Can't use --all when scaling")
        if release_id:
            raise CommandError("ERROR: Can't use --all in combination with --release")
        show_all_formations(ctx)
        return
    app = ctx.app()
    client = ctx.client
    release = determine_release(client, app, release_id)
    formation = get_formation(client, app, release["id"])
    current: dict[str, int] = dict(formation.get("processes") or {})
    if not specs:
        print(scale_line(release, current))
        return
    scale(client, app, release, formation, parse_scale(specs, release), not args["--no-wait"])


def determine_release(client: Client, app: str, release_id: str) -> dict[str, Any]:
    """The release `-r` names, else the app's current one."""
    if release_id:
        try:
            return client.get_release(release_id)
        except NotFound:
            raise CommandError(f"release {release_id} not found") from None
    try:
        return client.app_release(app)
    except NotFound:
        raise CommandError("No app release, specify a release with --release") from None


def get_formation(client: Client, app: str, release_id: str) -> dict[str, Any]:
    """The app's formation of a release; a bare 404 is a new, empty one."""
    try:
        return client.get_formation(app, release_id)
    except NotFound:
        return {"app": app, "release": release_id}


def scale_line(release: dict[str, Any], processes: dict[str, int]) -> str:
    """`web=4 worker=2`: every process type of the release with its count."""
    types = sorted(release.get("processes") or {})
    return " ".join(f"{t}={processes.get(t, 0)}" for t in types)


def show_all_formations(ctx: Context) -> None:
    """`scale --all`: each release of the app (newest first) with a non-zero formation, and
    the current one in any case, marked `(current)`; a blank line between releases."""
    app = ctx.app()
    client = ctx.client
    current_id = ctx.current_release_id(app)
    blocks = []
    for release in client.app_release_list(app):
        processes = get_formation(client, app, release["id"]).get("processes") or {}
        is_current = release["id"] == current_id
        if not is_current and not any(processes.values()):
            continue
        suffix = " (current)" if is_current else ""
        blocks.append(f"{release['id']}{suffix}\n{scale_line(release, processes)}\n")
    print("\n".join(blocks), end="")


def parse_scale(specs: list[str], release: dict[str, Any]) -> dict[str, int]:
    """`<type>=<qty>` arguments as {type: qty}; every type must be one of the release's."""
    wanted: dict[str, int] = {}
    unknown: list[str] = []
    types = release.get("processes") or {}
    for spec in specs:
        typ, sep, qty = spec.partition("=")
        if not sep:
            raise CommandError("ERROR: scale args must be of the form <typ>=<qty>")
        if not QUANTITY.fullmatch(qty):
            raise CommandError(f"ERROR: could not parse quantity in {go_quote(spec)}")
        n = int(qty)
        if n < 0:
            raise CommandError(f"ERROR: process quantities cannot be negative in {go_quote(spec)}")
        if typ in types:
            wanted[typ] = n
        else:
            unknown.append(go_quote(typ))
    if unknown:
        raise CommandError(f"ERROR: unknown process types: {', '.join(unknown)}")
    return wanted


def scale(
    client: Client,
    app: str,
    release: dict[str, Any],
    formation: dict[str, Any],
    wanted: dict[str, int],
    wait: bool,
) -> None:
    current: dict[str, int] = dict(formation.get("processes") or {})
    processes = {**current, **wanted}
    if all(current.get(t, 0) == n for t, n in processes.items()):
        print("requested scale equals current scale, nothing to do!")
        return
    changes = [
        f"{t}: {current.get(t, 0)}=>{processes.get(t, 0)}"
        for t in sorted(release.get("processes") or {})
        if current.get(t, 0) != processes.get(t, 0)
    ]
    print(f"scaling {', '.join(changes)}\n", flush=True)
    body = {**formation, "app": formation.get("app") or app, "processes": processes}
    if not wait:
        client.put_formation(body)
        return
    expected = expected_events(current, processes)
    # the stream is open before the formation changes: the first jobs' events are not missed
    with client.events(app_id=app, object_types=["job"]) as stream:
        client.put_formation(body)
        start = time.monotonic_ns()
        wait_for_job_events(stream, release["id"], expected, scale_timeout(), print_job_event)
    print(f"\nscale completed in {go_duration(time.monotonic_ns() - start)}")


def expected_events(current: dict[str, int], processes: dict[str, int]) -> JobEvents:
    """What moving from `current` to `processes` takes: `up` events for each job more,
    `down` events for each job fewer (Flynn's omni types count once: no cluster size here)."""
    expected: JobEvents = {}
    for typ, n in processes.items():
        diff = n - current.get(typ, 0)
        if diff > 0:
            expected[typ] = {"up": diff}
        elif diff < 0:
            expected[typ] = {"down": -diff}
    return expected


def scale_timeout() -> float:
    try:
        return float(os.environ.get("FLYNN_SCALE_TIMEOUT") or SCALE_TIMEOUT)
    except ValueError:
        return SCALE_TIMEOUT


def wait_for_job_events(
    stream: EventStream,
    release_id: str,
    expected: JobEvents,
    timeout: float,
    on_event: Callable[[dict[str, Any]], None],
) -> None:
    """Read job events until those of `release_id` add up exactly to `expected`; each of
    them (state `crashed`/`failed` read as `down`) is passed to `on_event` first.
    CommandError after `timeout` seconds without an event of the release."""
    actual: JobEvents = {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            event = stream.next(timeout=max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise CommandError(f"timed out waiting for job events: {go_map(expected)}") from None
        except StopIteration:
            raise CommandError("unexpected close of job event stream") from None
        job = dict(event.get("data") or {})
        if job.get("release") != release_id:
            continue
        if job.get("state") in DOWN_STATES:
            job["state"] = "down"
        job.setdefault("id", event.get("object_id", ""))
        counts = actual.setdefault(job.get("type") or "", {})
        counts[job.get("state", "")] = counts.get(job.get("state", ""), 0) + 1
        deadline = time.monotonic() + timeout
        on_event(job)
        if all(
            actual.get(typ, {}).get(state, 0) == n
            for typ, states in expected.items()
            for state, n in states.items()
        ):
            return


def print_job_event(job: dict[str, Any]) -> None:
    now = dt.datetime.now()
    stamp = f"{now:%H:%M:%S}.{now.microsecond // 1000:03d}"
    typ, job_id, state = job.get("type", ""), job.get("id", ""), job.get("state", "")
    print(f"{stamp} ==> {typ} {job_id} {state}", flush=True)


def go_map(events: JobEvents) -> str:
    """Go's `%v` of a map of maps (keys sorted): `map[web:map[up:3]]`."""
    inner = (
        f"{t}:map[{' '.join(f'{s}:{n}' for s, n in sorted(states.items()))}]"
        for t, states in sorted(events.items())
    )
    return f"map[{' '.join(inner)}]"


def go_duration(ns: int) -> str:
    """Go's `time.Duration.String()`: `1.234567s`, `2m3.5s`, `512.3ms`, `0s`."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_fraction(ns, 3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_fraction(ns, 6)}ms"
    secs, rest = divmod(ns, 1_000_000_000)
    hours, secs = divmod(secs, 3600)
    minutes, secs = divmod(secs, 60)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + _fraction(secs * 1_000_000_000 + rest, 9) + "s"


def _fraction(n: int, digits: int) -> str:
    """`n / 10**digits` with the fraction's trailing zeros (and a bare point) left out."""
    whole, frac = divmod(n, 10**digits)
    tail = f"{frac:0{digits}d}".rstrip("0")
    return f"{whole}.{tail}" if tail else str(whole)
