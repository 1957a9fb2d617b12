"""`git push flynn master` of the Node.js example (`examples/nodejs`) on a one-host development
cluster, from the push to the first 200 through the router, next to the Node.js buildpack's own
`bin/compile` run alone on the same machine in the same run: the platform's overhead as ratios
(push → 200 / compile alone) and differences.

* **cold**: a new app (`flynn create -y`), an empty build cache, the first deploy and the
  receiver's `web=1` scale; the first 200 whose body is the example's page. Against it,
  `bin/compile /app /cache /env` with an empty cache directory.
* **warm**: a second push of a one-line change to `server.js` (the app's strategy set to
  `one-by-one` after the cold push), so the build cache is restored and the old web job serves
  until the new one is up; the first 200 whose body has the change. Against it, `bin/compile`
  of the changed source (a fresh app directory, as a push gives) with the cache directory the
  cold compile left.

The compile alone runs as the buildpacks' tests run it (`buildpacks/tests/stackbuild.py`): in
the `slugbuilder` image, as nobody, with app, cache and env directories bound and the
machine's /etc/ssl/certs over the image's (npm reaches the registry through the machine's
TLS-inspecting proxy). Only the compile process is timed; the stack root's own set-up (loop
and overlay mounts, a `true` run alone) is printed beside it.

The push is the one a user makes: `flynn cluster add -p <pin>` in a private HOME, GIT_*
variables stripped (the machine's GIT_SSL_CAINFO would override the cluster's CA), real git
over HTTPS to `git.<domain>`. Its output is read as it arrives, and each `----->`/`=====>`
line is timestamped, which splits the push into: receive (push → `Building`), build set-up
(job start, source, cache restore → `app detected`), compile in the cluster (→ `Discovering
process types`, bin/compile and bin/release), slug (process types, mksquashfs, uploads of
the slug and the cache → `Creating release`), deploy (release, deployment → `Application
deployed`), the `web=1` scale (cold only) and the end of the push. A poller thread GETs `/`
on the host's address with `Host: <app>.<domain>` every 50 ms from the moment the push starts.

Each of `--rounds` rounds uses new apps and new cache directories; the order alternates
(compile first in odd rounds, push first in even ones) so the first download from the npm
registry and load drift hit both. Printed per round, then the medians; `--json` prints the
same numbers as JSON.

    FLYNN_IMAGES=/var/lib/flynn/images python bench/build.py [--rounds 2] [--json]

It needs root, the images `make dev` builds and the npm registry; about 2.5 minutes for two
rounds (a cluster boot is ~40 s). From a git worktree, run it with a virtualenv of that
worktree (bench/README.md says why). It prints and asserts nothing. The cluster is taken down at
the end, also on an error, Ctrl-C or SIGTERM, and what it left (if anything) is named; the
scratch directory (`/tmp/bench-build-XXXX`) is removed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from buildpacks.tests.stackbuild import App, Stacks  # noqa: E402
from flynn_host.dev.cluster import Cluster  # noqa: E402
from tests.dev.test_cluster import booted_cluster  # noqa: E402
from tests.test_gitpush_cluster import Env, system_job_env  # noqa: E402

EXAMPLE = ROOT / "examples" / "nodejs"
PAGE = "Hello from Node.js"
# the one-line change of the warm push (server.js's answer)
OLD, NEW = "on Flynn!", "on Flynn! (second push)"
POLL = 0.05
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# the receiver's and slugbuilder's steps, as a line of the push starts (or ends) with them
MARKS = {
    "building": "-----> Building ",
    "detected": " app detected",  # the line's end: "-----> Node.js app detected"
    "types": "-----> Discovering process types",
    "release": "-----> Creating release...",
    "deployed": "=====> Application deployed",
    "scaled": "=====> Added default web=1 formation",
}
# (key, label, from mark, to mark); "start", "returned" and "first_200" are the bench's own
PHASES = [
    ("receive", "push → `Building`", "start", "building"),
    ("build_setup", "`Building` → `app detected` (job, source, cache)", "building", "detected"),
    ("compile", "compile + release in the cluster (→ `Discovering`)", "detected", "types"),
    ("slug", "slug: process types, squashfs, uploads", "types", "release"),
    ("deploy", "`Creating release` → `Application deployed`", "release", "deployed"),
    ("scale", "`web=1` scale (cold only)", "deployed", "scaled"),
    ("build_to_deployed", "`Building` → `Application deployed`", "building", "deployed"),
    ("push", "git push (wall)", "start", "returned"),
    ("after_push", "push returned → first 200", "returned", "first_200"),
]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load() -> float:
    return os.getloadavg()[0]


# --- the push ---------------------------------------------------------------------------


@dataclass
class Push:
    """One push: when each step's line arrived, when git returned and the first 200 came, all
    in seconds from the push's start."""

    rc: int
    lines: list[tuple[float, str]]
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def phases(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, _, a, b in PHASES:
            ta = 0.0 if a == "start" else self.marks.get(a)
            tb = self.marks.get(b)
            out[key] = tb - ta if ta is not None and tb is not None else None
        return out


class Poller(threading.Thread):
    """GETs the app through the router every POLL seconds until a 200 whose body has `text`."""

    def __init__(self, env: Env, app: str, text: str, started: float) -> None:
        super().__init__(daemon=True)
        self.env, self.app, self.text, self.started = env, app, text, started
        self.stop = threading.Event()
        self.at: float | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = self.env.http(self.app)
                if status == 200 and self.text in body:
                    self.at = time.monotonic() - self.started
                    return
            except (OSError, ValueError, IndexError):
                pass
            self.stop.wait(POLL)


def push(env: Env, work: Path, app: str, text: str, timeout: float = 900) -> Push:
    """`git push flynn master`, its output read as it comes (a line's time is when its end
    arrived), and a poller from the same moment on."""
    started = time.monotonic()
    poller = Poller(env, app, text, started)
    poller.start()
    proc = subprocess.Popen(["git", "push", "flynn", "master"], cwd=work,
                            env=env.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    lines: list[tuple[float, str]] = []
    partial = b""
    try:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            now = time.monotonic() - started
            # git's progress lines end with \r, the remote's with \n
            *done, partial = re.split(rb"[\r\n]", partial + chunk)
            lines += [(now, ANSI.sub("", x.decode(errors="replace"))) for x in done if x]
        rc = proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = Push(rc, lines)
    result.marks["returned"] = time.monotonic() - started
    for at, line in lines:
        step = line.removeprefix("remote:").strip()
        for key, mark in MARKS.items():
            hit = step.endswith(mark) if key == "detected" else step.startswith(mark)
            if hit and step.startswith(("----->", "=====>")):
                result.marks.setdefault(key, at)
    if rc == 0:
        poller.join(120)
    poller.stop.set()
    poller.join()
    if poller.at is not None:
        result.marks["first_200"] = poller.at
    return result


def cli_env(c: Cluster, home: Path) -> Env:
    """The CLI set up as a user does, against the cluster's router certificate's pin."""
    router = system_job_env(c, "router")
    der = x509.load_pem_x509_certificate(router["TLSCERT"].encode()).public_bytes(Encoding.DER)
    pin = base64.b64encode(hashlib.sha256(der).digest()).decode()
    key = router["CONTROLLER_KEY"]
    env = Env(c, home, key)
    env.flynn("cluster", "add", "-p", pin, "default", c.domain, key)
    return env


def pushes(env: Env, name: str) -> dict[str, Push]:
    """The cold push of a new app, then the warm push of the one-line change."""
    work = env.new_app(name, EXAMPLE)
    say(f"  {name}: cold push")
    cold = push(env, work, name, PAGE)
    if cold.rc != 0 or "first_200" not in cold.marks:
        raise RuntimeError(f"cold push of {name} failed (rc {cold.rc}):\n{cold.output}")
    env.api("POST", f"/apps/{name}", {"strategy": "one-by-one"})
    server = work / "server.js"
    server.write_text(server.read_text().replace(OLD, NEW))
    env.commit(work, "a one-line change")
    say(f"  {name}: warm push")
    warm = push(env, work, name, NEW)
    if warm.rc != 0 or "first_200" not in warm.marks:
        raise RuntimeError(f"warm push of {name} failed (rc {warm.rc}):\n{warm.output}")
    if not re.search(r"cach", warm.output, re.I):
        say("  note: the warm push's output does not mention the cache")
    return {"cold": cold, "warm": warm}


# --- the compile alone ------------------------------------------------------------------


def compiles(stacks: Stacks, tmp: Path) -> dict[str, Any]:
    """bin/compile of the example with an empty cache, then of the changed source with the
    cache the first one left; and the stack root's set-up alone (`true`)."""
    app = App.from_example(stacks, "nodejs", "nodejs", tmp)
    changed = tmp / "changed"
    shutil.copytree(EXAMPLE, changed)
    (changed / "server.js").write_text((changed / "server.js").read_text().replace(OLD, NEW))
    out: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        if kind == "warm":
            app.push(changed)
        say(f"  compile alone, {kind}")
        build = app.step("compile", "/app", "/cache", "/env")
        if build.returncode != 0:
            raise RuntimeError(f"{kind} compile failed ({build.returncode}):\n{build.output}")
        out[kind] = build.seconds
        out[f"{kind}_output"] = build.output
    started = time.monotonic()
    stacks.builder.run(["true"])
    out["setup"] = time.monotonic() - started
    return out


# --- the run ----------------------------------------------------------------------------


def run(rounds: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-build-"))
    results: list[dict[str, Any]] = []
    loads = {"before": load()}
    try:
        with Stacks() as stacks:
            say("booting a one-host cluster")
            with booted_cluster(1) as c:
                loads["booted"] = load()
                home = scratch / "home"
                home.mkdir()
                env = cli_env(c, home)
                for r in range(1, rounds + 1):
                    say(f"round {r}/{rounds} (load {load():.2f})")
                    tmp = scratch / f"compile{r}"
                    tmp.mkdir()
                    row: dict[str, Any] = {"load_start": load()}
                    if r % 2:
                        row["compile"] = compiles(stacks, tmp)
                        row["push"] = pushes(env, f"bench{r}")
                    else:
                        row["push"] = pushes(env, f"bench{r}")
                        row["compile"] = compiles(stacks, tmp)
                    row["load_end"] = load()
                    results.append(row)
                say("taking the cluster down")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loads["after"] = load()
    return summarise(results, loads)


def figures(to_200: float, alone: float, phases: dict[str, float | None]) -> dict[str, Any]:
    return {
        "push_to_200_s": round(to_200, 2),
        "compile_alone_s": round(alone, 2),
        "ratio": round(to_200 / alone, 2),
        "difference_s": round(to_200 - alone, 2),
        "phases_s": {k: None if v is None else round(v, 2) for k, v in phases.items()},
    }


def summarise(results: list[dict[str, Any]], loads: dict[str, float]) -> dict[str, Any]:
    rounds = []
    for row in results:
        r: dict[str, Any] = {"load": [round(row["load_start"], 2), round(row["load_end"], 2)]}
        for kind in ("cold", "warm"):
            p: Push = row["push"][kind]
            r[kind] = figures(p.marks["first_200"], row["compile"][kind], p.phases())
            # what each printed (the push's lines with their times), for --json readers
            r[kind]["push_output"] = [[round(t, 2), line] for t, line in p.lines]
            r[kind]["compile_output"] = row["compile"][f"{kind}_output"]
        r["stackroot_setup_s"] = round(row["compile"]["setup"], 2)
        rounds.append(r)

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    medians: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        to_200 = statistics.median(r[kind]["push_to_200_s"] for r in rounds)
        alone = statistics.median(r[kind]["compile_alone_s"] for r in rounds)
        phases = {key: median([r[kind]["phases_s"][key] for r in rounds]) for key, *_ in PHASES}
        medians[kind] = figures(to_200, alone, phases)
    medians["stackroot_setup_s"] = median([r["stackroot_setup_s"] for r in rounds])
    return {
        "example": "nodejs",
        "rounds": rounds,
        "median": medians,
        "load": {k: round(v, 2) for k, v in loads.items()},
    }


# --- output -----------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "s") -> str:
    return f"{v:7.2f}{unit}" if v is not None else "      —"


def print_block(title: str, r: dict[str, Any]) -> None:
    c, w = r["cold"], r["warm"]
    print(title)
    print(f"  {'':54} {'cold':>8} {'warm':>8}")
    print(f"  {'git push → first 200 through the router':54} {fmt(c['push_to_200_s'])} "
          f"{fmt(w['push_to_200_s'])}")  # fmt: skip
    print(f"  {'bin/compile alone (same machine, same run)':54} {fmt(c['compile_alone_s'])} "
          f"{fmt(w['compile_alone_s'])}")  # fmt: skip
    print(f"  {'ratio push → 200 / compile alone':54} {fmt(c['ratio'], '×')} "
          f"{fmt(w['ratio'], '×')}")  # fmt: skip
    print(f"  {'difference (the platform)':54} {fmt(c['difference_s'])} "
          f"{fmt(w['difference_s'])}")  # fmt: skip
    print("  where the push's time goes:")
    for key, label, *_ in PHASES:
        print(f"    {label:52} {fmt(c['phases_s'][key])} {fmt(w['phases_s'][key])}")
    print(f"  the stack root's set-up alone (in each compile alone): {r['stackroot_setup_s']:.2f}s")


def print_result(result: dict[str, Any]) -> None:
    n = len(result["rounds"])
    loads = result["load"]
    print(f"Node.js example: git push → first 200 on a one-host cluster, next to bin/compile "
          f"alone; load {loads['before']:.2f} before, {loads['after']:.2f} after")  # fmt: skip
    for i, r in enumerate(result["rounds"], 1):
        first = "compile first" if i % 2 else "push first"
        print_block(f"round {i} ({first}; load {r['load'][0]:.2f} → {r['load'][1]:.2f})", r)
    print_block(f"median of {n} round{'s' if n > 1 else ''}", result["median"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/build.py needs root (namespaces, mounts)")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so the cluster is taken down
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
