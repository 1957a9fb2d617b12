"""Helpers of the `flynn` CLI's tests (the fixtures are in conftest.py): a private home for
each test (its own `~/.flynnrc`, `~/.flynn/` and global git configuration, so the real user's
are never touched), running the installed `flynn` console script in it, and throwaway git
repositories."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FLYNN = str(Path(sys.executable).parent / "flynn")


@dataclass
class Home:
    """A user's home for the CLI: `run()` runs `flynn` with it, `git()` runs git with it."""

    path: Path
    env: dict[str, str]

    @property
    def flynnrc(self) -> Path:
        return Path(self.env["FLYNNRC"])

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLYNN, *args],
            cwd=cwd or self.path,
            input=input if input is not None else "",
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run `flynn`; it must succeed."""
        out = self.run(*args, **kw)  # type: ignore[arg-type]
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out

    def fail(self, *args: str, **kw: object) -> str:
        """Run `flynn`; it must fail with exit status 1. Its stderr."""
        out = self.run(*args, **kw)  # type: ignore[arg-type]
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        return out.stderr

    def git(self, *args: str, cwd: Path | None = None) -> str:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd or self.path,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def git_input(self, *args: str, input: str) -> str:
        out = subprocess.run(
            ["git", *args],
            cwd=self.path,
            env={**self.env, "GIT_TERMINAL_PROMPT": "0"},
            input=input,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def repo(self, name: str = "repo") -> Path:
        """A fresh git repository under the home."""
        path = self.path / name
        path.mkdir()
        self.git("init", "-q", cwd=path)
        return path


def home_env(path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLYNN", "GIT_")) and k not in ("HOME", "XDG_CONFIG_HOME")
    }
    env.update(
        HOME=str(path),
        FLYNNRC=str(path / ".flynnrc"),
        GIT_CONFIG_GLOBAL=str(path / ".gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.test",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.test",
    )
    return env
