"""`git push flynn master` against a booted one-host cluster (shared by the module), as a user
does it from the machine: `flynn cluster add` (which points git at the cluster's CA and at
`flynn git-credentials`), `flynn create`, then real git over HTTPS to `git.<domain>` through
the router. Every example app in examples/ is built by its buildpack and answers 200 on
`<app>.<domain>`; the push output has the seed's steps in order; a second push deploys
without a failed request and uses the build cache; the failures a pusher can cause each end
with a clear message, the previous release serving, and nothing half-made left."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from flynn_host.dev.cluster import Cluster
from tests.dev.test_cluster import SYSTEM_APPS, booted_cluster
from tests.test_router_cluster import system_job_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FLYNN = os.path.join(os.path.dirname(sys.executable), "flynn")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Env:
    cluster: Cluster
    home: Path
    key: str

    @property
    def domain(self) -> str:
        return self.cluster.domain

    def environ(self) -> dict[str, str]:
        # the machine's own GIT_SSL_CAINFO would override the CA `flynn cluster add` set
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update({"HOME": str(self.home), "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
                    "FLYNNRC": str(self.home / ".flynnrc")})  # fmt: skip
        return env

    def run(self, *argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=cwd, env=self.environ(), capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def flynn(self, *args: str, cwd: Path | None = None) -> str:
        out = self.run(FLYNN, *args, cwd=cwd or self.home, timeout=180)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout + out.stderr

    def new_app(self, name: str, source: Path | None = None) -> Path:
        """A git work tree of `source` (an example) with a `flynn` remote for app `name`."""
        work = self.home / name
        if source is not None:
            shutil.copytree(source, work)
        else:
            work.mkdir()
        for args in (("init", "-q", "-b", "master"), ("config", "user.email", "t@example.test"),
                     ("config", "user.name", "t")):  # fmt: skip
            assert self.run("git", *args, cwd=work).returncode == 0
        self.commit(work, "first")
        self.flynn("create", "-y", name, cwd=work)
        return work

    def commit(self, work: Path, message: str) -> None:
        assert self.run("git", "add", "-A", ".", cwd=work).returncode == 0
        out = self.run("git", "commit", "-q", "--allow-empty", "-m", message, cwd=work)
        assert out.returncode == 0, out.stderr

    def push(self, work: Path, *args: str) -> tuple[int, str]:
        out = self.run("git", "push", "flynn", *(args or ("master",)), cwd=work)
        return out.returncode, ANSI.sub("", out.stdout + out.stderr)

    def http(self, app: str, path: str = "/") -> tuple[int, str]:
        """GET through the router on the host's address with `Host: <app>.<domain>`."""
        ip = self.cluster.ips()[0]
        with socket.create_connection((ip, 80), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {app}.{self.domain}\r\n"
                         "Connection: close\r\n\r\n".encode())  # fmt: skip
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """The controller's API as the CLI reaches it: `https://controller.<domain>`
        (resolved by the /etc/hosts line of `script/cluster up`), verified with the CA
        `flynn cluster add` saved."""
        ctx = ssl.create_default_context(cafile=str(self.home / ".flynn/ca-certs/default.pem"))
        auth = base64.b64encode(f":{self.key}".encode()).decode()
        req = urllib.request.Request(
            f"https://controller.{self.domain}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return json.loads(r.read() or b"null")

    def wait_serving(self, app: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.http(app)
                if last[0] == 200 and text in last[1]:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"{app} does not serve {text!r}: last {last}")

    def build_jobs_running(self) -> list[str]:
        jobs = self.cluster.client(1).list_jobs(active=True)
        return [
            jid
            for jid, j in jobs.items()
            if (j["job"].get("metadata") or {}).get("flynn-gitreceive.build")
        ]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with booted_cluster(1) as c:
        router = system_job_env(c, "router")
        der = x509.load_pem_x509_certificate(router["TLSCERT"].encode()).public_bytes(Encoding.DER)
        pin = base64.b64encode(hashlib.sha256(der).digest()).decode()
        key = router["CONTROLLER_KEY"]
        e = Env(c, tmp_path_factory.mktemp("gitpush-home"), key)
        e.flynn("cluster", "add", "-p", pin, "default", c.domain, key)
        yield e


def steps(output: str) -> list[str]:
    """The `----->`/`=====>` lines of a push, without git's `remote:` prefix."""
    out = []
    for line in output.splitlines():
        line = line.removeprefix("remote:").strip()
        if line.startswith(("----->", "=====>")):
            out.append(line)
    return out


def test_one_host_runs_the_whole_platform_with_singleton_counts(env: Env) -> None:
    """The default manifest on one host: every system app, each process type once (the
    manifest's counts of 2 and 3 clamped to 1), and the status check passed (bootstrap ends
    only after it)."""
    jobs = env.cluster.client(1).list_jobs(active=True).values()
    kinds: dict[tuple[str, str], int] = {}
    for job in jobs:
        meta = job["job"].get("metadata") or {}
        if meta.get("flynn-controller.app_name") in SYSTEM_APPS:
            key = (meta["flynn-controller.app_name"], meta.get("flynn-controller.type", ""))
            kinds[key] = kinds.get(key, 0) + 1
    assert {app for app, _ in kinds} == SYSTEM_APPS
    assert set(kinds.values()) == {1}, kinds


EXAMPLE_APPS = [
    # (example directory, buildpack name, text its page contains)
    ("nodejs", "Node.js", "Node.js"),
    ("python-flask", "Python", "Hello from Python"),
    ("go", "Go", "Hello from Go"),
    ("ruby-sinatra", "Ruby", "Sinatra"),
    ("php", "PHP", "Hello from PHP"),
    ("java", "Java", "Hello from Java"),
    ("static", "Static HTML", "Static"),
]


@pytest.mark.parametrize(("example", "buildpack", "text"), EXAMPLE_APPS)
def test_each_example_is_pushed_built_and_served(
    env: Env, example: str, buildpack: str, text: str
) -> None:
    name = f"ex-{example}"
    work = env.new_app(name, EXAMPLES / example)
    rc, output = env.push(work)
    assert rc == 0, output
    seen = steps(output)
    # the seed's getting-started steps, in order
    wanted = [
        f"-----> Building {name}...",
        f"-----> {buildpack} app detected",
        "-----> Creating release...",
        "=====> Application deployed",
        "=====> Added default web=1 formation",
    ]
    assert [s for s in seen if s in wanted] == wanted, output
    assert any(s.startswith("-----> Compiled slug size is") for s in seen), output
    assert "* [new branch]      master -> master" in output
    env.wait_serving(name, text)
    assert env.build_jobs_running() == []
    # the app's log has the build's output (shipped from the build job's host) and the
    # controller's deploy progress beside the app's own lines
    deadline = time.monotonic() + 30
    while True:
        log = env.flynn("-a", name, "log")
        if f"{buildpack} app detected" in log and "controller[deploy." in log:
            break
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.5)


def test_a_second_push_deploys_without_a_failed_request_and_uses_the_cache(env: Env) -> None:
    work = env.new_app("again", EXAMPLES / "nodejs")
    started = time.monotonic()
    rc, output = env.push(work)
    first = time.monotonic() - started
    assert rc == 0, output
    env.wait_serving("again", "Node.js")
    # several web jobs, so one-by-one always has one serving
    env.flynn("scale", "web=2", cwd=work)

    failures: list[Any] = []
    served = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                status, _ = env.http("again")
                served[0] += 1
                if status != 200:
                    failures.append(status)
            except OSError as exc:
                failures.append(repr(exc))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        server = work / "server.js"
        if server.exists():
            server.write_text(server.read_text().replace("Node.js", "Node.js, second push"))
        else:
            (work / "second.txt").write_text("second\n")
        env.commit(work, "second")
        started = time.monotonic()
        rc, output = env.push(work)
        second = time.monotonic() - started
        assert rc == 0, output
        time.sleep(1)
    finally:
        stop.set()
        poller.join()
    print(f"\nnode example push: first {first:.1f}s, second (cached) {second:.1f}s")
    assert "=====> Application deployed" in output
    assert "Added default web=1 formation" not in output
    assert re.search(r"cache", output, re.I), output
    assert failures == [] and served[0] > 10, (failures, served)
    assert len(env.api("GET", "/apps/again/releases")) == 2


def test_a_failed_build_keeps_the_previous_release_and_leaves_nothing(env: Env) -> None:
    work = env.new_app("broken", EXAMPLES / "go")
    rc, output = env.push(work)
    assert rc == 0, output
    env.wait_serving("broken", "Hello from Go")
    releases = env.api("GET", "/apps/broken/releases")
    (work / "main.go").write_text((work / "main.go").read_text() + "\nthis is not go\n")
    env.commit(work, "break it")
    rc, output = env.push(work)
    assert rc != 0
    assert "pre-receive hook declined" in output
    assert "Push rejected: the build failed" in output
    env.wait_serving("broken", "Hello from Go", timeout=5)
    assert env.api("GET", "/apps/broken/releases") == releases
    assert env.build_jobs_running() == []


def test_a_crashing_process_type_is_rolled_back(env: Env) -> None:
    work = env.new_app("crashy", EXAMPLES / "static")
    rc, output = env.push(work)
    assert rc == 0, output
    env.wait_serving("crashy", "Static")
    releases = env.api("GET", "/apps/crashy/releases")
    (work / "Procfile").write_text("web: echo about to crash; exit 3\n")
    env.commit(work, "crash")
    rc, output = env.push(work)
    assert rc != 0, output
    assert "Push rejected: the deployment failed" in output
    env.wait_serving("crashy", "Static", timeout=5)
    assert env.api("GET", "/apps/crashy/releases") == releases


def test_no_buildpack_and_other_branches_are_refused(env: Env) -> None:
    work = env.new_app("nothing")
    (work / "README").write_text("nothing to build\n")
    env.commit(work, "readme")
    rc, output = env.push(work)
    assert rc != 0 and "-----> Unable to select a buildpack" in output
    rc, output = env.push(work, "master:feature")
    assert rc != 0 and "Only a push to master deploys" in output
    assert env.api("GET", "/apps/nothing/releases") == []


def test_a_push_without_the_key_or_to_an_unknown_app_is_refused(env: Env) -> None:
    work = env.new_app("keyless")
    url = f"https://git.{env.domain}/keyless.git"
    out = env.run("git", "-c", "credential.helper=", "push", url, "master", cwd=work)
    assert out.returncode != 0 and "could not read Username" in out.stderr
    out = env.run("git", "push", f"https://git.{env.domain}/no-such-app.git", "master", cwd=work)
    assert out.returncode != 0 and "not found" in out.stderr


def test_build_features_env_source_version_slugignore_and_buildpacks(env: Env) -> None:
    # a buildpack pushed to the cluster itself, named by BUILDPACK_URL
    bp = env.new_app("shout-buildpack")
    (bp / "bin").mkdir()
    (bp / "bin" / "detect").write_text("#!/bin/sh\necho Shout\n")
    (bp / "bin" / "compile").write_text(
        "#!/bin/bash\nset -e\n"
        'echo "-----> Shouting GREETING=$(cat "$3/GREETING") SOURCE_VERSION=$SOURCE_VERSION"\n'
        'ls -a "$1" | tr "\\n" " "; echo\n'
        'echo "$(cat "$3/GREETING")!" > "$1/index.html"\n'
    )
    (bp / "bin" / "release").write_text(
        "#!/bin/sh\nprintf -- '---\\ndefault_process_types:\\n"
        "  web: exec python3 -m http.server $PORT\\n'\n"
    )
    for f in ("detect", "compile", "release"):
        (bp / "bin" / f).chmod(0o755)
    env.commit(bp, "a buildpack")
    rc, output = env.push(bp)
    # a buildpack is stored, not built
    assert rc == 0 and "is a buildpack" in output, output

    work = env.new_app("shout")
    (work / "secret.key").write_text("do not ship\n")
    (work / ".slugignore").write_text("*.key\n")
    env.commit(work, "app")
    env.flynn("env", "set", "GREETING=hello-env",
              f"BUILDPACK_URL=https://git.{env.domain}/shout-buildpack.git", cwd=work)  # fmt: skip
    rev = env.run("git", "rev-parse", "HEAD", cwd=work).stdout.strip()
    rc, output = env.push(work)
    assert rc == 0, output
    assert f"Shouting GREETING=hello-env SOURCE_VERSION={rev}" in output
    line = next(x for x in output.splitlines() if ".slugignore" in x and "secret" not in x)
    assert line and "secret.key" not in output.split("Shouting", 1)[1].split("\n", 2)[1]
    env.wait_serving("shout", "hello-env!")

    # .buildpacks: the built-in static buildpack by Heroku's URL, then nothing else
    multi = env.new_app("multi", EXAMPLES / "static")
    (multi / ".buildpacks").write_text("https://github.com/heroku/heroku-buildpack-static\n")
    env.commit(multi, "buildpacks")
    rc, output = env.push(multi)
    assert rc == 0, output
    assert "-----> Static HTML app detected" in output
    env.wait_serving("multi", "Static")


def test_flynn_run_on_a_slug_app_goes_through_the_runner(env: Env) -> None:
    work = env.new_app("runner", EXAMPLES / "static")
    rc, output = env.push(work)
    assert rc == 0, output
    out = env.flynn("run", "--", "bash", "-c", 'echo "$HOME $(id -un) $(pwd)"', cwd=work)
    assert "/app nobody /app" in out


def slow_buildpack(env: Env, name: str, seconds: int) -> str:
    """A buildpack stored in the cluster whose compile says `compiling` and then sleeps."""
    bp = env.new_app(name)
    (bp / "bin").mkdir()
    (bp / "bin" / "detect").write_text("#!/bin/sh\necho Slow\n")
    (bp / "bin" / "compile").write_text(
        f'#!/bin/sh\necho "-----> compiling $SOURCE_VERSION"\nsleep {seconds}\n'
        'echo "$SOURCE_VERSION" > "$1/index.html"\n'
    )
    (bp / "bin" / "release").write_text(
        "#!/bin/sh\nprintf -- '---\\ndefault_process_types:\\n"
        "  web: python3 -m http.server $PORT\\n'\n"
    )
    for f in ("detect", "compile", "release"):
        (bp / "bin" / f).chmod(0o755)
    env.commit(bp, "slow buildpack")
    rc, output = env.push(bp)
    assert rc == 0, output
    return f"https://git.{env.domain}/{name}.git"


def start_push(env: Env, work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(["git", "push", "--progress", "flynn", "master"], cwd=work,
                            env=env.environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += ANSI.sub("", line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never came: {seen}")


@pytest.mark.slow
def test_an_interrupted_push_stops_its_build_and_leaves_nothing(env: Env) -> None:
    url = slow_buildpack(env, "slow-buildpack", 60)
    work = env.new_app("interrupted", EXAMPLES / "static")
    rc, output = env.push(work)
    assert rc == 0, output
    env.wait_serving("interrupted", "Static")
    env.flynn("env", "set", f"BUILDPACK_URL={url}", cwd=work)
    releases = env.api("GET", "/apps/interrupted/releases")
    env.commit(work, "second")
    proc = start_push(env, work)
    try:
        read_until(proc, "-----> compiling")
        assert env.build_jobs_running() != []
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    deadline = time.monotonic() + 30
    while env.build_jobs_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert env.build_jobs_running() == []
    assert env.api("GET", "/apps/interrupted/releases") == releases
    env.wait_serving("interrupted", "Static", timeout=5)
    # the interrupted push was not kept: the same push again is a new one, and it deploys
    env.flynn("env", "unset", "BUILDPACK_URL", cwd=work)
    rc, output = env.push(work)
    assert rc == 0, output


@pytest.mark.slow
def test_two_pushes_to_one_app_are_serialised(env: Env) -> None:
    url = slow_buildpack(env, "slower-buildpack", 8)
    first = env.new_app("twice")
    env.flynn("env", "set", f"BUILDPACK_URL={url}", cwd=first)
    second = env.home / "twice-other"
    shutil.copytree(first, second)
    (first / "a.txt").write_text("a\n")
    env.commit(first, "a")
    (second / "b.txt").write_text("b\n")
    env.commit(second, "b")
    a = start_push(env, first)
    try:
        read_until(a, "-----> compiling")
        b = start_push(env, second)
        out_b, _ = b.communicate(timeout=300)
        out_a, _ = a.communicate(timeout=300)
    finally:
        for p in (a,):
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    out_b = ANSI.sub("", out_b)
    assert a.returncode == 0, out_a
    # the second waited for the first, then was refused without building
    assert b.returncode != 0, out_b
    assert "another push came first" in out_b and "-----> Building" not in out_b
    rev = env.run("git", "rev-parse", "HEAD", cwd=first).stdout.strip()
    env.wait_serving("twice", rev)


@pytest.mark.slow
def test_a_200mb_repository_is_pushed_built_and_served(env: Env) -> None:
    work = env.new_app("large", EXAMPLES / "static")
    data = work / "data"
    data.mkdir()
    for i in range(4):
        (data / f"part{i}.bin").write_bytes(os.urandom(50 << 20))
    env.commit(work, "200 MB of data")
    started = time.monotonic()
    rc, output = env.push(work)
    assert rc == 0, output
    env.wait_serving("large", "Static")
    print(f"\n200 MB push to first 200: {time.monotonic() - started:.1f}s")
    assert env.http("large", "/data/part3.bin")[0] == 200
