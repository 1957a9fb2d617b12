"""What the buildpacks' tests share: build an app with one buildpack of this working tree the way
slugbuilder does, and run it the way slugrunner does, without a cluster.

Building (`detect`, `compile`, `release`) happens in the `slugbuilder` image, as nobody, in
/app, with a cache (/cache) and an env directory (/env, one file per config var) kept on the
host between builds, and with the buildpack under test bound read-only from the tree over the
image's copy at /builder/buildpacks/<name>, so the tests test the tree. The environment is
slugbuilder's (`STACK`, `REQUEST_ID`, `CURL_*`, a scratch `HOME`); a successful `compile` is
followed by `bin/release`, whose output is written to /app/.release as slugbuilder does.

Running happens in the `slugrunner` image through its real entrypoint: `/runner/init start web`
(the Procfile's or /app/.release's `web` command, after /app/.profile.d/*.sh) for `serving`,
`/runner/init <argv>` for a one-off command (`flynn run`). init starts as root and drops to
nobody itself; the config vars and `PORT` are in the environment.

The machine's /etc/ssl/certs is bound over the image's for both: where the registries (PyPI,
npm) are reached through a TLS-inspecting proxy, its CA (in /usr/local/share/ca-certificates,
so in the machine's bundle) must be trusted inside too, as BUILD_CA_CERTS makes a cluster's
builds trust it.

    @pytest.fixture(scope="module")
    def stacks() -> Iterator[Stacks]:
        with Stacks() as s:
            yield s

    app = App.from_example(stacks, "nodejs", "nodejs", tmp_path)
    assert app.compile().returncode == 0
    with app.serving(port) as url:
        assert "Node.js" in get(url)[1]

The tests run as root: files the tests add to the app are handed to nobody before each step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flynn_host.dev.stackroot import NOBODY, StackRoot, writable_dir

BUILDPACKS = Path(__file__).resolve().parents[1]
EXAMPLES = BUILDPACKS.parent / "examples"
CERTS = "/etc/ssl/certs"
# what slugbuilder's build exports to the buildpacks (packaging/slug/builder/build)
BUILD_ENV = {
    "HOME": "/tmp",  # slugbuilder's is a scratch directory; /tmp is private to each run
    "STACK": "flynn-bookworm",
    "REQUEST_ID": "flynn-build",
    "CURL_CONNECT_TIMEOUT": "30",
    "CURL_TIMEOUT": "600",
    "SOURCE_VERSION": "",
}


def chown_tree(path: Path, uid: int = NOBODY) -> None:
    """Hand a tree to the chrooted user (the tests run as root); symlinks are left alone."""
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if not p.is_symlink() and (st.st_uid, st.st_gid) != (uid, uid):
            os.chown(p, uid, uid)


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    """Status and body of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def process_types(release: str) -> dict[str, str]:
    """`default_process_types` of a release's YAML (the buildpacks write it flat)."""
    types: dict[str, str] = {}
    inside = False
    for line in release.splitlines():
        if line.startswith("default_process_types:"):
            inside = True
        elif inside and line.startswith("  ") and ":" in line:
            name, _, command = line.strip().partition(":")
            types[name] = command.strip()
        elif line.strip() and not line.startswith(" "):
            inside = False
    return types


class Stacks:
    """The slugbuilder and slugrunner images (from `$FLYNN_IMAGES`), where apps are built and
    run; a context manager, so their scratch directories are removed."""

    def __init__(self) -> None:
        self.builder = StackRoot("slugbuilder")
        self.runner = StackRoot("slugrunner")

    def __enter__(self) -> Stacks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.builder.close()
        self.runner.close()


@dataclass
class Build:
    """What one buildpack step printed (stdout and stderr together), its status and time."""

    output: str
    returncode: int
    seconds: float


@dataclass
class App:
    """An app directory with its cache and env directories, built by `buildpack`."""

    stacks: Stacks
    buildpack: str
    app: Path
    cache: Path
    env: Path
    served_output: str = ""  # what the last `serving` web process printed

    # --- the app's source -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, stacks: Stacks, buildpack: str, src: Path, tmp: Path) -> App:
        app = cls(
            stacks, buildpack, tmp / "app", writable_dir(tmp, "cache"), writable_dir(tmp, "env")
        )
        app.push(src)
        return app

    @classmethod
    def from_example(cls, stacks: Stacks, buildpack: str, example: str, tmp: Path) -> App:
        return cls.from_dir(stacks, buildpack, EXAMPLES / example, tmp)

    @classmethod
    def from_files(cls, stacks: Stacks, buildpack: str, files: dict[str, str], tmp: Path) -> App:
        src = tmp / "src"
        for name, text in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        return cls.from_dir(stacks, buildpack, src, tmp)

    def push(self, src: Path) -> None:
        """Replace the app directory with a fresh copy of `src`, as a new push gives the next
        build (the cache and env directories stay)."""
        shutil.rmtree(self.app, ignore_errors=True)
        shutil.copytree(src, self.app, symlinks=True)
        chown_tree(self.app)

    def write(self, relpath: str, text: str) -> None:
        """Add or replace a file of the app."""
        path = self.app / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        chown_tree(self.app)

    def edit(self, relpath: str, old: str, new: str) -> None:
        """Replace `old` (which must be there) with `new` in a file of the app."""
        text = (self.app / relpath).read_text()
        assert old in text, f"{old!r} not in {relpath}"
        self.write(relpath, text.replace(old, new))

    def set_env(self, **config: str) -> None:
        """Config vars, one file each, as slugbuilder writes them into ENV_DIR (the web
        process and one-off commands get them too)."""
        for name, value in config.items():
            (self.env / name).write_text(value)
            os.chown(self.env / name, NOBODY, NOBODY)

    def clear_env(self) -> None:
        for path in self.env.iterdir():
            path.unlink()

    def config(self) -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted(self.env.iterdir())}

    # --- building, in slugbuilder -------------------------------------------------------------

    def step(self, name: str, *args: str) -> Build:
        """Run the buildpack's bin/<name> as nobody, as slugbuilder does."""
        chown_tree(self.app)
        pack = f"/builder/buildpacks/{self.buildpack}"
        started = time.monotonic()
        result = self.stacks.builder.run(
            [f"{pack}/bin/{name}", *args],
            binds={
                BUILDPACKS / self.buildpack: pack,
                self.app: "/app",
                self.cache: "/cache",
                self.env: "/env",
                CERTS: CERTS,
            },
            read_only=[pack, CERTS],
            env=BUILD_ENV,
            cwd="/app",
            timeout=900,
        )
        return Build(result.stdout, result.returncode, time.monotonic() - started)

    def detect(self) -> Build:
        return self.step("detect", "/app")

    def compile(self, check: bool = False) -> Build:
        """bin/compile, then (if it succeeded) bin/release into /app/.release, as slugbuilder
        does; a failing release fails the build. `seconds` counts both."""
        build = self.step("compile", "/app", "/cache", "/env")
        if build.returncode == 0 and (BUILDPACKS / self.buildpack / "bin" / "release").exists():
            release = self.step("release", "/app")
            seconds = build.seconds + release.seconds
            if release.returncode != 0:
                build = Build(build.output + release.output, release.returncode, seconds)
            else:
                (self.app / ".release").write_text(release.output)
                os.chown(self.app / ".release", NOBODY, NOBODY)
                build = Build(build.output, 0, seconds)
        if check and build.returncode != 0:
            raise AssertionError(f"compile failed ({build.returncode}):\n{build.output}")
        return build

    def release(self) -> dict[str, str]:
        """The default process types bin/release gives."""
        release = self.step("release", "/app")
        assert release.returncode == 0, release.output
        return process_types(release.output)

    def web_command(self) -> str:
        """The command slugrunner starts for `web`: the Procfile's, else the release's."""
        procfile = self.app / "Procfile"
        if procfile.exists():
            for line in procfile.read_text().splitlines():
                name, _, command = line.partition(":")
                if name.strip() == "web" and command.strip():
                    return command.strip()
        return self.release()["web"]

    # --- running, in slugrunner ---------------------------------------------------------------

    def _in_runner(self, env: dict[str, str] | None) -> dict[str, Any]:
        return {
            "binds": {self.app: "/app", CERTS: CERTS},
            "read_only": [CERTS],
            "env": {**self.config(), **(env or {})},
            "user": 0,  # init drops to nobody itself
            "cwd": "/app",
        }

    def run(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A one-off command in the app's environment, as `flynn run` runs it."""
        return self.stacks.runner.run(["/runner/init", *argv], **self._in_runner(env))

    def popen(
        self, *argv: str, env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """`run`, started (kill the Popen to stop everything it started)."""
        return self.stacks.runner.popen(["/runner/init", *argv], **self._in_runner(env), **kwargs)

    @contextmanager
    def serving(self, port: int, wait: float = 30) -> Iterator[str]:
        """Start the web process with `/runner/init start web` and `PORT`; yields the URL of
        `/` once it answers. What it printed is in `served_output` afterwards."""
        # a file, not a pipe nobody reads: a chatty server must not block on its logs
        with tempfile.TemporaryFile() as log:
            proc = self.popen(
                "start", "web", env={"PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT
            )

            def printed() -> str:
                log.seek(0)
                return log.read().decode(errors="replace")

            url = f"http://127.0.0.1:{port}/"
            try:
                deadline = time.monotonic() + wait
                while True:
                    if proc.poll() is not None:
                        raise AssertionError(f"web exited {proc.returncode}:\n{printed()}")
                    try:
                        get(url, timeout=2)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise AssertionError(
                                f"nothing answered on {url}:\n{printed()}"
                            ) from None
                        time.sleep(0.2)
                yield url
            finally:
                proc.kill()
                proc.wait()
                self.served_output = printed()
