"""The daemon's flag defaults are written once, in the `HostConfig` dataclass: what
`flynn-host help daemon` shows and what `flynn-host daemon` gets without flags both come from
it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flynn_host.cli.daemon import parse_daemon_args
from flynn_host.client import HOST_KEY_ENV
from flynn_host.config import HostConfig
from flynn_host.runtime.images import DEFAULT_IMAGES_DIR

from .conftest import ROOT

KEY = "k" * 32


@pytest.fixture
def no_host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty host config instead of /etc/flynn/host.json, and a host key."""
    config = tmp_path / "host.json"
    config.write_text("{}")
    monkeypatch.setenv("FLYNN_HOST_CONFIG", str(config))
    monkeypatch.setenv(HOST_KEY_ENV, KEY)
    monkeypatch.delenv("FLYNN_IMAGES", raising=False)
    return config


def plain_defaults() -> dict[str, object]:
    return {
        f.name: f.default
        for f in dataclasses.fields(HostConfig)
        if f.default is not dataclasses.MISSING
    }


def test_help_daemon_shows_the_dataclass_defaults(no_host_config: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "flynn_host.cli.main", "help", "daemon"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    flags = dict(re.findall(r"^  --([a-z-]+)=\S+ +(.*)$", out.stdout, flags=re.M))
    assert {"http-port", "state", "stop-timeout", "shim-pool"} <= set(flags), out.stdout
    defaults = plain_defaults()
    for flag, text in flags.items():
        shown = re.search(r"\[default: ([^\]]+)\]", text)
        field = flag.replace("-", "_")
        if field not in defaults or defaults[field] in ("", None):
            assert not shown, f"--{flag} shows a default the dataclass does not have: {text}"
            continue
        value = defaults[field]
        want = f"{value:g}" if isinstance(value, float) else str(value)
        assert shown and shown[1] == want, f"--{flag}: {text!r}, HostConfig says {want}"
    assert f"$FLYNN_IMAGES [default: {DEFAULT_IMAGES_DIR}]" in out.stdout


def test_daemon_without_flags_gets_the_dataclass_defaults(no_host_config: Path) -> None:
    assert parse_daemon_args([]) == HostConfig(host_key=KEY)
