"""What the buildpacks' tests share: build an app with one buildpack the way slugbuilder does
(detect, compile, release inside the `stack` image as nobody, the app at /app, a cache and an
env directory kept on the host) and run its web process the way slugrunner does, then ask it
for `/` on loopback.

    app = BuiltApp.from_example(root, "go", "go", tmp_path)
    app.compile(check=True)
    with app.serving(port) as url:
        assert "Go" in http_get(url)[1]
"""

from __future__ import annotations

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

from flynn_host.dev.stackroot import NOBODY, StackRoot, writable_dir

BUILDPACKS = Path(__file__).resolve().parents[1]
EXAMPLES = BUILDPACKS.parent / "examples"


def chown_tree(path: Path, uid: int = NOBODY) -> None:
    """Hand a tree over to the chrooted user (the tests run as root)."""
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            shutil.chown(p, uid, uid)


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def parse_release(text: str) -> dict[str, str]:
    """The default process types of a release's YAML (the buildpacks write flat YAML)."""
    types: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("default_process_types:"):
            inside = True
        elif inside and line.startswith("  ") and ":" in line:
            name, _, command = line.strip().partition(":")
            types[name] = command.strip()
        elif line and not line.startswith(" "):
            inside = False
    return types


@dataclass
class BuiltApp:
    """An app directory with its cache and env directories, built by `buildpack`."""

    root: StackRoot
    buildpack: str
    app: Path
    cache: Path
    env: Path

    @classmethod
    def from_dir(cls, root: StackRoot, buildpack: str, src: Path, tmp: Path) -> BuiltApp:
        built = cls(
            root, buildpack, tmp / "app", writable_dir(tmp, "cache"), writable_dir(tmp, "env")
        )
        built.push(src)
        return built

    def push(self, src: Path) -> None:
        """Replace the app directory with a fresh copy of `src`, as a new push would give the
        next build (the cache directory stays)."""
        shutil.rmtree(self.app, ignore_errors=True)
        shutil.copytree(src, self.app, symlinks=True)
        chown_tree(self.app)

    @classmethod
    def from_example(cls, root: StackRoot, buildpack: str, example: str, tmp: Path) -> BuiltApp:
        return cls.from_dir(root, buildpack, EXAMPLES / example, tmp)

    def write(self, relpath: str, text: str) -> None:
        """Add or replace a file of the app (owned by nobody, as a push would leave it)."""
        path = self.app / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        chown_tree(self.app)

    def set_env(self, name: str, value: str) -> None:
        (self.env / name).write_text(value)

    def _run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        binds = {
            self.app: "/app",
            self.cache: "/cache",
            self.env: "/env",
            BUILDPACKS: "/builder/buildpacks",
        }
        return self.root.run(
            argv,
            binds=binds,
            read_only=["/builder/buildpacks"],
            env={"HOME": "/tmp", "STACK": "stack"},
            cwd="/app",
            **kwargs,  # type: ignore[arg-type]
        )

    def bin(self, script: str) -> str:
        return f"/builder/buildpacks/{self.buildpack}/bin/{script}"

    def detect(self) -> subprocess.CompletedProcess[str]:
        return self._run([self.bin("detect"), "/app"])

    def compile(self, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = self._run([self.bin("compile"), "/app", "/cache", "/env"])
        if check and result.returncode != 0:
            raise AssertionError(f"compile failed ({result.returncode}):\n{result.stdout}")
        return result

    def timed_compile(self) -> tuple[float, subprocess.CompletedProcess[str]]:
        started = time.monotonic()
        result = self.compile(check=True)
        return time.monotonic() - started, result

    def release(self) -> dict[str, str]:
        result = self._run([self.bin("release"), "/app"])
        assert result.returncode == 0, result.stdout
        return parse_release(result.stdout)

    def web_command(self) -> str:
        procfile = self.app / "Procfile"
        if procfile.exists():
            for line in procfile.read_text().splitlines():
                if line.startswith("web:"):
                    return line.removeprefix("web:").strip()
        return self.release()["web"]

    @contextmanager
    def serving(self, port: int, timeout: float = 30) -> Iterator[str]:
        """Start the web process as slugrunner would; yield its URL once it answers."""
        script = (
            'for f in /app/.profile.d/*.sh; do [ -r "$f" ] && . "$f"; done; '
            f"exec {self.web_command()}"
        )
        env = {"PORT": str(port), "HOME": "/app"}
        env.update({p.name: p.read_text() for p in self.env.iterdir()})
        # a file, not a pipe nobody reads: a chatty server must not block on its logs
        with tempfile.TemporaryFile() as log:
            proc = self.root.popen(
                ["bash", "-c", script],
                binds={self.app: "/app"},
                env=env,
                cwd="/app",
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}/"
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if proc.poll() is not None:
                        log.seek(0)
                        out = log.read().decode(errors="replace")
                        raise AssertionError(f"web process exited {proc.returncode}:\n{out}")
                    try:
                        http_get(url, timeout=2)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise AssertionError(f"nothing answered on {url}") from None
                        time.sleep(0.2)
                yield url
            finally:
                proc.kill()
                proc.wait()
