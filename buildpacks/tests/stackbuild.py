"""What the Node.js, Python and static buildpacks' tests share: build an app the way slugbuilder
does (detect, compile, release inside the `stack` image as nobody, the app at /app, a cache and
an env directory kept on the host between builds) and start its web process the way slugrunner
does (sources `/app/.profile.d/*.sh`, runs the Procfile's or the release's `web` command with
`bash -c`, `PORT` set), then ask it for `/` on loopback.

    app = App.from_example(tmp_path, "nodejs")
    build = app.compile(root)
    with app.serving(root, port) as url:
        assert "Node.js" in get(url)[1]

The machine's CA bundle is bound over the stack's: where the registries are reached through an
intercepting proxy (as on the developers' machines), its certificate must be trusted inside too.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev.stackroot import NOBODY, StackRoot, writable_dir

BUILDPACKS = Path(__file__).resolve().parents[1]
EXAMPLES = BUILDPACKS.parent / "examples"
CERTS = "/etc/ssl/certs"


def chown_tree(path: Path, uid: int = NOBODY) -> None:
    """Hand a tree to the chrooted user (the tests run as root)."""
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            shutil.chown(p, uid, uid)


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


@dataclass
class Build:
    output: str
    returncode: int
    seconds: float


@dataclass
class App:
    """An app directory with its cache and env directories."""

    app: Path
    cache: Path
    env: Path
    served_output: str = ""  # what the last `serving` process printed

    @classmethod
    def from_dir(cls, src: Path, tmp: Path) -> App:
        app = tmp / "app"
        shutil.copytree(src, app, symlinks=True)
        chown_tree(app)
        return cls(app, writable_dir(tmp, "cache"), writable_dir(tmp, "env"))

    @classmethod
    def from_example(cls, example: str, tmp: Path) -> App:
        return cls.from_dir(EXAMPLES / example, tmp)

    @classmethod
    def from_files(cls, files: dict[str, str], tmp: Path) -> App:
        src = tmp / "src"
        for name, text in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        return cls.from_dir(src, tmp)

    def set_env(self, **config: str) -> None:
        """Config vars, one file each, as slugbuilder writes them into ENV_DIR."""
        for name, value in config.items():
            (self.env / name).write_text(value)
            shutil.chown(self.env / name, NOBODY, NOBODY)

    def clear_env(self) -> None:
        for path in self.env.iterdir():
            path.unlink()

    def _binds(self) -> dict[str | Path, str]:
        return {
            BUILDPACKS: "/builder/buildpacks",
            self.app: "/app",
            self.cache: "/cache",
            self.env: "/env",
            CERTS: CERTS,
        }

    def run_bin(self, root: StackRoot, buildpack: str, step: str, *args: str) -> Build:
        start = time.monotonic()
        result = root.run(
            [f"/builder/buildpacks/{buildpack}/bin/{step}", *args],
            binds=self._binds(),
            read_only=["/builder/buildpacks", CERTS],
            cwd="/app",
            env={"HOME": "/tmp"},  # slugbuilder's HOME is a scratch directory
            timeout=900,
        )
        return Build(result.stdout, result.returncode, time.monotonic() - start)

    def detect(self, root: StackRoot, buildpack: str) -> Build:
        return self.run_bin(root, buildpack, "detect", "/app")

    def compile(self, root: StackRoot, buildpack: str) -> Build:
        return self.run_bin(root, buildpack, "compile", "/app", "/cache", "/env")

    def release(self, root: StackRoot, buildpack: str) -> dict[str, str]:
        build = self.run_bin(root, buildpack, "release", "/app")
        assert build.returncode == 0, build.output
        return process_types(build.output)

    def web_command(self, root: StackRoot, buildpack: str) -> str:
        procfile = self.app / "Procfile"
        if procfile.exists():
            for line in procfile.read_text().splitlines():
                name, _, command = line.partition(":")
                if name.strip() == "web":
                    return command.strip()
        return self.release(root, buildpack)["web"]

    @contextmanager
    def serving(self, root: StackRoot, command: str, port: int, wait: float = 30) -> Iterator[str]:
        """Run `command` as slugrunner would; yields the URL of `/` once it answers. What it
        printed is in `served_output` afterwards."""
        script = 'for f in /app/.profile.d/*.sh; do [ -r "$f" ] && . "$f"; done; exec ' + command
        proc = root.popen(
            ["bash", "-c", script],
            binds=self._binds(),
            read_only=["/builder/buildpacks", CERTS],
            env={"PORT": str(port)},
            cwd="/app",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + wait
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"{command!r} exited {proc.returncode}:\n{_out(proc)}")
                try:
                    get(url, timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{command!r} did not answer on {port}") from None
                    time.sleep(0.2)
            yield url
        finally:
            proc.kill()
            proc.wait()
            self.served_output = _out(proc)
            if proc.stdout:
                proc.stdout.close()


def _out(proc: subprocess.Popen[str]) -> str:
    return proc.stdout.read() if proc.stdout else ""
