"""Fixtures of the `flynn` CLI's tests: a private home per test (see cli_home.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_home import Home, home_env


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    path = tmp_path / "home"
    path.mkdir()
    yield Home(path, home_env(path))


@pytest.fixture
def private_home(home: Home, monkeypatch: pytest.MonkeyPatch) -> Home:
    """`home`, also made this process's home and environment (for in-process tests)."""
    for k in list(os.environ):
        if k.startswith(("FLYNN", "GIT_")):
            monkeypatch.delenv(k)
    for k, v in home.env.items():
        monkeypatch.setenv(k, v)
    return home
