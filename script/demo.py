"""`make demo`: the product's main job, as a newcomer would do it, printed as a transcript.

Boots a cluster on this machine with `script/cluster up` (3 hosts, or 1 on a machine with less
than 8 GiB of memory or fewer than 2 CPUs; `DEMO_HOSTS=N` chooses), every host a `flynn-host`
daemon in its own network namespace, bootstrapped with the whole platform. Then, with the
`flynn` CLI and git from this machine, as a developer: `flynn cluster add` (the line bootstrap
printed), `flynn create`, `git push flynn master` of examples/nodejs, curl through the router,
`flynn scale web=3` and curls answered by the three jobs, `flynn log`, `flynn run`, `flynn env
set` (a deploy, polled meanwhile: no failed request), `flynn resource add postgres` and a query
from the app, `flynn route add http`, and the app deleted. Finally `script/cluster down` and a
check that nothing of the cluster is left on the machine, whatever happened before.

Each command is printed with `$` and its output as the user would see it; what the demo itself
measures or checks is printed in dim `#` lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flynn_host.dev.cluster import Cluster, leftovers  # noqa: E402

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
NAME = "demo"
APP = "example"
FLYNN = str(ROOT / ".venv" / "bin" / "flynn")
ADD_LINE = re.compile(r"^flynn cluster add .*$", re.M)


def say(text: str) -> None:
    print(f"\n{BOLD}# {text}{RESET}", flush=True)


def note(text: str) -> None:
    print(f"{DIM}# {text}{RESET}", flush=True)


class Demo:
    def __init__(self, home: Path, hosts: int) -> None:
        self.home = home
        self.hosts = hosts
        self.domain = f"{NAME}.localflynn"
        self.ip = ""
        self.work = home / "nodejs-example"
        # the machine's own GIT_* settings (e.g. GIT_SSL_CAINFO) would override what
        # `flynn cluster add` configures for git: the cluster's CA and its credential helper
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        self.env.update({"HOME": str(home), "FLYNNRC": str(home / ".flynnrc"),
                         "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"})  # fmt: skip
        self.timings: list[tuple[str, float]] = []

    # --- running commands as the user would ----------------------------------------------

    def run(self, argv: list[str], show: str | None = None, cwd: Path | None = None,
            timeout: float = 600, check: bool = True) -> str:  # fmt: skip
        """Run a command, printing it and its output as it comes (stdout and stderr merged)."""
        print(f"{DIM}${RESET} {show or shlex.join(argv)}", flush=True)
        proc = subprocess.Popen(argv, cwd=cwd or self.work, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            line = ANSI.sub("", line)
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
            if time.monotonic() > deadline:
                proc.kill()
        code = proc.wait()
        if check and code != 0:
            raise SystemExit(f"demo: `{show or shlex.join(argv)}` failed (exit status {code})")
        return "".join(lines)

    def flynn(self, *args: str, **kw: object) -> str:
        return self.run([FLYNN, *args], show="flynn " + shlex.join(args), **kw)  # type: ignore[arg-type]

    def curl(self, path: str = "/", host: str | None = None) -> str:
        host = host or f"{APP}.{self.domain}"
        argv = ["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:80:{self.ip}",
                f"http://{host}{path}"]  # fmt: skip
        return self.run(argv, check=False)

    def get(self, path: str = "/", host: str | None = None) -> tuple[int, str]:
        """A quiet request through the router: (status, body), status 0 on no answer."""
        host = host or f"{APP}.{self.domain}"
        out = subprocess.run(
            ["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", "--resolve",
             f"{host}:80:{self.ip}", f"http://{host}{path}"],
            capture_output=True, text=True,
        )  # fmt: skip
        body, _, code = out.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def wait_for(self, what: str, check: object, timeout: float = 120) -> float:
        started = time.monotonic()
        while not check():  # type: ignore[operator]
            if time.monotonic() - started > timeout:
                raise SystemExit(f"demo: timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.2)
        return time.monotonic() - started

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.timings.append((what, time.monotonic() - started))

    # --- the walk-through ---------------------------------------------------------------

    def cluster_up(self) -> str:
        say(f"{self.hosts} host(s) on this machine, bootstrapped with the whole platform")
        with self.timed("script/cluster up (daemons + flynn-host bootstrap)"):
            out = self.run([str(ROOT / "script" / "cluster"), "up", "--name", NAME,
                            "-n", str(self.hosts)], cwd=ROOT, timeout=1200)  # fmt: skip
        found = ADD_LINE.search(out)
        if not found:
            raise SystemExit("demo: bootstrap printed no `flynn cluster add` line")
        self.ip = Cluster(name=NAME).ips()[0]
        return found.group(0)

    def walk(self, add_line: str) -> None:
        say("the line bootstrap printed, pasted on this machine: the CLI now talks to the cluster")
        self.run(shlex.split(add_line.replace("flynn ", f"{FLYNN} ", 1)), show=add_line,
                 cwd=self.home)  # fmt: skip
        self.flynn("apps", cwd=self.home)

        say("an app from examples/nodejs: git init, flynn create, git push flynn master")
        shutil.copytree(ROOT / "examples" / "nodejs", self.work)
        for args in (["init", "-q", "-b", "master"], ["add", "."],
                     ["-c", "user.name=Demo", "-c", "user.email=demo@example.test",
                      "commit", "-q", "-m", "Node.js example"]):  # fmt: skip
            subprocess.run(["git", *args], cwd=self.work, env=self.env, check=True)
        note(f"cd {self.work} (git init, git add ., git commit)")
        self.flynn("create", APP)
        started = time.monotonic()
        with self.timed("git push (first, no build cache) until the app answers"):
            self.run(["git", "push", "flynn", "master"], timeout=900)
            self.wait_for("the app through the router", lambda: self.get()[0] == 200)
        note(f"push to first 200 through the router: {time.monotonic() - started:.1f}s")
        self.curl()

        say("flynn scale web=3: three jobs, and the router takes turns between them")
        self.flynn("scale", "web=3")
        self.flynn("ps")
        # one curl, three requests on one connection: one router worker, round robin
        url = f"http://{APP}.{self.domain}/"
        out = self.run(["curl", "-sS", "--max-time", "10", "--resolve",
                        f"{APP}.{self.domain}:80:{self.ip}", url, url, url])  # fmt: skip
        seen = set(re.findall(r"\(job (\S+)\)", out))
        if len(seen) != 3:
            raise SystemExit(f"demo: 3 requests reached {len(seen)} job(s), not 3: {seen}")
        note("three requests, three different jobs")

        say("flynn log: every job's output, collected from all hosts")
        self.flynn("log", "-n", "8")
        self.flynn("log", "-n", "3", "-t", "web", "-r")

        say("flynn run: a one-off job with the app's release")
        self.flynn("run", "--", "echo", "hello from a one-off job")

        say("flynn env set: a new release, deployed job by job while requests keep flowing")
        poller = Poller(self)
        with poller, self.timed("flynn env set (a deploy of 3 jobs)"):
            self.flynn("env", "set", "GREETING=Bonjour")
            self.wait_for("the new release", lambda: "Bonjour" in self.get()[1], 60)
        note(f"{poller.total} requests during the deploy, {len(poller.failed)} failed"
             + (f": {poller.failed[:3]}" if poller.failed else ""))  # fmt: skip
        if poller.failed:
            raise SystemExit("demo: requests failed during the deploy")
        self.curl()
        self.flynn("release")

        say("flynn resource add postgres: a database, and the app queries it")
        self.flynn("resource", "add", "postgres")
        self.wait_for("the release with the database", lambda: self.get("/db")[0] == 200, 120)
        self.curl("/db")
        self.curl("/db")
        self.flynn("env", "get", "PGDATABASE")

        say("flynn route add http: the app on a domain of its own")
        domain = "www.example.test"
        self.flynn("route", "add", "http", domain)
        self.flynn("route")
        self.wait_for(f"{domain} on the router", lambda: self.get(host=domain)[0] == 200, 30)
        self.curl(host=domain)

        say("a second push: the build cache makes it quicker")
        server = self.work / "server.js"
        server.write_text(server.read_text().replace("on Flynn!", "on Flynn, pushed again!"))
        subprocess.run(["git", "-c", "user.name=Demo", "-c", "user.email=demo@example.test",
                        "commit", "-q", "-am", "second push"], cwd=self.work, env=self.env,
                       check=True)  # fmt: skip
        started = time.monotonic()
        with self.timed("git push (second, build cache) until the new code answers"):
            self.run(["git", "push", "flynn", "master"], timeout=900)
            self.wait_for("the new code", lambda: "pushed again" in self.get()[1], 60)
        note(f"second push to the new code answering: {time.monotonic() - started:.1f}s")
        self.curl()

        say("flynn delete: the app, its jobs, routes and database go")
        self.flynn("delete", "-y")
        self.flynn("apps", cwd=self.home)


class Poller:
    """Requests to the app in a loop (a background thread) while a deploy runs."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.total = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.is_set():
            code, body = self.demo.get()
            self.total += 1
            if code != 200:
                self.failed.append(f"{code} {body[:60]!r}")
            time.sleep(0.05)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def default_hosts() -> int:
    if os.environ.get("DEMO_HOSTS"):
        return int(os.environ["DEMO_HOSTS"])
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 3 if mem >= 8 * 2**30 and (os.cpu_count() or 1) >= 2 else 1


def main() -> int:
    images = Path(os.environ.get("FLYNN_IMAGES", "/var/lib/flynn/images"))
    for name in ("components", "postgres", "stack", "slugbuilder", "slugrunner"):
        if not (images / name / "manifest.json").exists():
            raise SystemExit(f"demo: image {name} is missing in {images}: run `make images`")
    if Cluster(name=NAME).exists():
        raise SystemExit(
            f"demo: a cluster '{NAME}' exists already: `script/cluster down --name {NAME}`"
        )
    started = time.monotonic()
    hosts = default_hosts()
    with tempfile.TemporaryDirectory(prefix="flynn-demo-") as home:
        demo = Demo(Path(home), hosts)
        try:
            demo.walk(demo.cluster_up())
        finally:
            say("script/cluster down: every daemon, job, namespace, bridge, mount and hosts line")
            with demo.timed("script/cluster down"):
                demo.run([str(ROOT / "script" / "cluster"), "down", "--name", NAME], cwd=ROOT,
                         check=False)  # fmt: skip
            left = leftovers(Cluster(name=NAME))
            if left:
                raise SystemExit(f"demo: left behind: {left}")
            note("nothing left behind")
    say("timings")
    for what, seconds in demo.timings:
        print(f"  {seconds:7.1f}s  {what}")
    print(f"  {time.monotonic() - started:7.1f}s  the whole demo ({hosts} host(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
