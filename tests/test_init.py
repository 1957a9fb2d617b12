"""`flynn-host init`: the host config file it writes, and creating a cluster at a discovery
service (a tiny aiohttp one on loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from flynn_host.dev import host as devhost

from .conftest import ROOT


def init(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flynn_host.cli.main", "init", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )


def test_writes_only_given_flags(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "flynn" / "host.json"
    out = init(
        "--file",
        str(conf),
        "--external-ip",
        "10.0.0.1",
        "--peer-ips",
        "10.0.0.1, 10.0.0.2,10.0.0.3",
    )
    assert out.returncode == 0, out.stderr
    written = json.loads(conf.read_text())
    assert written == {
        "args": ["--external-ip", "10.0.0.1", "--peer-ips", "10.0.0.1,10.0.0.2,10.0.0.3"],
        "env": {},
        "host_key": written["host_key"],
    }
    assert [p.name for p in conf.parent.iterdir()] == ["host.json"]  # no temporary file left


def test_host_key_is_made_once_kept_and_root_only(tmp_path: Path) -> None:
    conf = tmp_path / "host.json"
    out = init("--file", str(conf))
    assert out.returncode == 0, out.stderr
    key = json.loads(conf.read_text())["host_key"]
    assert len(key) == 64 and int(key, 16) >= 0
    assert "generated a new host key" in out.stderr and key not in out.stderr + out.stdout
    assert conf.stat().st_mode & 0o777 == 0o600
    # a second init keeps the key; --host-key (or $FLYNN_HOST_KEY) replaces it
    assert init("--file", str(conf), "--external-ip", "10.0.0.2").returncode == 0
    assert json.loads(conf.read_text())["host_key"] == key
    assert init("--file", str(conf), "--host-key", "k" * 20).returncode == 0
    assert json.loads(conf.read_text())["host_key"] == "k" * 20
    assert init("--file", str(conf), env={"FLYNN_HOST_KEY": "e" * 16}).returncode == 0
    assert json.loads(conf.read_text())["host_key"] == "e" * 16
    short = init("--file", str(conf), "--host-key", "short")
    assert short.returncode == 1 and "at least 16" in short.stderr
    assert json.loads(conf.read_text())["host_key"] == "e" * 16


def test_daemon_refuses_to_start_without_a_host_key(tmp_path: Path) -> None:
    conf = tmp_path / "host.json"
    conf.write_text("{}")
    out = subprocess.run(
        [sys.executable, "-m", "flynn_host.cli.main", "daemon", "--id", "h1"],
        env={**os.environ, "FLYNN_HOST_CONFIG": str(conf)},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 1
    assert "no host key: run `flynn-host init`" in out.stderr


def test_updates_an_existing_file(tmp_path: Path) -> None:
    conf = tmp_path / "host.json"
    conf.write_text(
        json.dumps(
            {
                "args": [
                    "--external-ip=10.0.0.9",
                    "--max-job-concurrency",
                    "8",
                    "--discovery",
                    "http://old/clusters/x",
                ],
                "env": {"A": "1"},
                "plugins": {"disable": ["p"]},
            }
        )
    )
    out = init("--file", str(conf), "--external-ip", "10.0.0.1", "--discovery", "http://d/c/1")
    assert out.returncode == 0, out.stderr
    assert json.loads(conf.read_text()) == {
        "host_key": json.loads(conf.read_text())["host_key"],
        "args": [
            "--max-job-concurrency",
            "8",
            "--external-ip",
            "10.0.0.1",
            "--discovery",
            "http://d/c/1",
        ],
        "env": {"A": "1"},
        "plugins": {"disable": ["p"]},
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--external-ip", "10.0.0"], "invalid --external-ip '10.0.0': not an IP address"),
        (["--peer-ips", "10.0.0.1,nope"], "invalid --peer-ips entry 'nope': not an IP address"),
        (["--init-discovery", "--discovery", "x"], "either --init-discovery or --discovery"),
    ],
)
def test_rejects_bad_flags(tmp_path: Path, args: list[str], message: str) -> None:
    conf = tmp_path / "host.json"
    out = init("--file", str(conf), *args)
    assert out.returncode == 1
    assert message in out.stderr
    assert not conf.exists()


@pytest.fixture
def discovery_server() -> Iterator[str]:
    """Flynn's discovery API, just `POST /clusters` → 201 with the cluster URL in Location."""

    async def create(request: web.Request) -> web.Response:
        return web.Response(status=201, headers={"Location": "/clusters/abc123"})

    app = web.Application()
    app.router.add_post("/clusters", create)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    port = devhost.free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_init_discovery(tmp_path: Path, discovery_server: str) -> None:
    conf = tmp_path / "host.json"
    out = init("--file", str(conf), "--init-discovery", env={"DISCOVERY_SERVER": discovery_server})
    assert out.returncode == 0, out.stderr
    token = f"{discovery_server}/clusters/abc123"
    assert out.stdout.strip() == token
    assert json.loads(conf.read_text())["args"] == ["--discovery", token]


def test_init_discovery_unreachable(tmp_path: Path) -> None:
    server = f"http://127.0.0.1:{devhost.free_port()}"  # nothing listens there
    conf = tmp_path / "host.json"
    out = init("--file", str(conf), "--init-discovery", env={"DISCOVERY_SERVER": server})
    assert out.returncode == 1
    assert f"cannot reach the discovery server {server}" in out.stderr
    assert "set DISCOVERY_SERVER" in out.stderr
    assert not conf.exists()


def test_daemon_accepts_what_init_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flynn_host.cli.daemon import parse_daemon_args

    conf = tmp_path / "host.json"
    assert (
        init(
            "--file",
            str(conf),
            "--peer-ips",
            "10.0.0.1,10.0.0.2",
            "--discovery",
            "http://d/clusters/1",
        ).returncode
        == 0
    )
    monkeypatch.setenv("FLYNN_HOST_CONFIG", str(conf))
    monkeypatch.delenv("FLYNN_HOST_KEY", raising=False)
    config = parse_daemon_args(["--id", "h1"])
    assert config.host_key == json.loads(conf.read_text())["host_key"]
    assert config.peer_ips == ["10.0.0.1", "10.0.0.2"]
    assert config.discovery == "http://d/clusters/1"
