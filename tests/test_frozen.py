"""The PyInstaller bundle (packaging/flynn-host.spec, `make dist`) behaves like the source tree.

The bundle is built once per session from the current tree into a temporary directory outside
the repository (about 10 s on two cores, so these tests stay in the default run), so what is
tested is always this tree, never a stale `dist/`. Every frozen process runs as on a host that
has no virtualenv: with a minimal environment (`PATH` only; no `PYTHONPATH`), from `/`, in a
private mount namespace where empty read-only tmpfs mounts hide the virtualenv, the system's
Python standard library and the repository's sources (`flynn_host/`, `plugins/`, `cli/`).
Nothing is deleted: the mounts exist only in that namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flynn_host import __version__
from flynn_host import frozen as frozen_mod
from flynn_host.dev import host as devhost
from flynn_host.plugins.manager import BUILTIN_PLUGINS, list_plugins, make_plugin_manager

from .conftest import (
    IMAGES,
    ROOT,
    Daemon,
    busybox_job,
    free_port,
    mounts_under,
    needs_root,
    remove_cgroups,
)

MINIMAL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SPEC = ROOT / "packaging" / "flynn-host.spec"
# the virtualenv (when the tests run from one, as `make test` does)
VENV = Path(sys.prefix).resolve() if sys.prefix != sys.base_prefix else None
# what a host without the development setup lacks: the virtualenv, the system's Python stdlib
# (the bundle carries its own) and the source tree
HIDDEN = sorted(
    {
        str(Path(p).resolve())
        for p in (
            VENV,
            ROOT / ".venv",
            sysconfig.get_paths()["stdlib"],
            ROOT / "flynn_host",
            ROOT / "plugins",
            ROOT / "cli",
        )  # fmt: skip
        if p is not None and Path(p).is_dir()
    }
)


@pytest.fixture(scope="session")
def bundle() -> Iterator[Path]:
    """dist/flynn-host/flynn-host, built from the current tree for this session."""
    tmp = Path(tempfile.mkdtemp(prefix="fh-bundle-", dir="/tmp"))
    try:
        build = subprocess.run(
            [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
             "--distpath", str(tmp / "dist"), "--workpath", str(tmp / "build"), str(SPEC)],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert build.returncode == 0, build.stderr[-3000:]
        exe = tmp / "dist" / "flynn-host" / "flynn-host"
        assert os.access(exe, os.X_OK)
        yield exe
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def without_venv(command: list[str]) -> list[str]:
    """`command` in a private mount namespace where HIDDEN are empty directories."""
    mounts = "".join(f"mount -t tmpfs -o ro,size=4k fh-hidden {shlex.quote(d)} && " for d in HIDDEN)
    # unshare and sh both exec: the command keeps the pid Popen reports
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", f'{mounts}exec "$@"', "sh", *command]  # fmt: skip


def host_env(**extra: str) -> dict[str, str]:
    return {"PATH": MINIMAL_PATH, **extra}


def run_frozen(exe: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(without_venv([str(exe), *args]), env=host_env(**env), cwd="/",
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def idle_shims(jobs_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"shim {jobs_dir} --idle"], capture_output=True,
                         text=True)  # fmt: skip
    return [int(pid) for pid in out.stdout.split()]


class FrozenDaemon(Daemon):
    """A devhost daemon run from the bundle, as on a host without the virtualenv."""

    exe: Path
    ns_fd: int | None = None  # its mount namespace, kept open to clean up inside it

    def args(self) -> list[str]:
        args = super().args()
        return [str(self.exe), *args[args.index("daemon") :]]

    def start(self, timeout: float = 20.0) -> None:
        self.write_host_config()
        env = host_env(FLYNN_HOST_CONFIG=str(self.base / "host.json"), **self.env)
        self.proc = subprocess.Popen(without_venv(self.args()), env=env, cwd="/")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if self.ns_fd is None:
                with contextlib.suppress(OSError):
                    ns = f"/proc/{self.proc.pid}/ns/mnt"
                    if os.readlink(ns) != os.readlink("/proc/self/ns/mnt"):  # after unshare
                        self.ns_fd = os.open(ns, os.O_RDONLY)
            with contextlib.suppress(OSError, ConnectionError):
                self.client.status()
                assert self.ns_fd is not None
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer in {timeout}s: {self.log()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_frozen(self.exe, *args, FLYNN_HOST_ADDR=f"127.0.0.1:{self.port}",
                          FLYNN_HOST_CONFIG=str(self.base / "host.json"))  # fmt: skip

    def in_namespace(self, *command: str) -> subprocess.CompletedProcess[str]:
        assert self.ns_fd is not None
        return subprocess.run(["nsenter", f"--mount=/proc/self/fd/{self.ns_fd}", *command],
                              pass_fds=[self.ns_fd], capture_output=True, text=True)  # fmt: skip

    def mounts(self) -> list[str]:
        """Mount points under `base` in the daemon's namespace (not visible outside it)."""
        out = self.in_namespace("cat", "/proc/self/mounts").stdout
        return [
            ln.split()[1] for ln in out.splitlines() if ln.split()[1].startswith(str(self.base))
        ]

    def cleanup(self) -> None:
        """devhost.Daemon.cleanup, with the frozen shims' command lines and the mounts made
        in the daemon's own namespace (released with it, but unmounted here explicitly)."""
        self.stop()
        self.remove_containers()
        if self.ns_fd is not None:
            for mnt in sorted(self.mounts(), key=len, reverse=True):
                self.in_namespace("umount", "-d", "-l", mnt)
            os.close(self.ns_fd)
            self.ns_fd = None
        remove_cgroups(f"flynn/{self.host_id}")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def make_frozen(bundle: Path, busybox_manifest: Path) -> Iterator[Any]:
    made: list[FrozenDaemon] = []

    def factory(**env: str) -> FrozenDaemon:
        plain = devhost.make_daemon(start=False, env=env)
        d = FrozenDaemon(plain.host_id, plain.port, plain.base, env=plain.env)
        d.exe = bundle
        made.append(d)
        d.start()
        return d

    yield factory
    for d in made:
        d.cleanup()


@pytest.fixture
def frozen(make_frozen: Any) -> FrozenDaemon:
    return make_frozen()


@needs_root
def test_the_development_setup_is_hidden_from_frozen_processes() -> None:
    """What the other tests rely on: in the namespace the bundle runs in, HIDDEN are empty."""
    assert str(ROOT / "flynn_host") in HIDDEN
    for d in HIDDEN:
        out = subprocess.run(without_venv(["ls", "-A", d]), env=host_env(),
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert out.stdout == "", d
        assert os.listdir(d)  # outside it, nothing changed


def bundled_modules(exe: Path) -> list[str]:
    """The Python modules in the bundle's archive, read with PyInstaller's own reader."""
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(str(exe))
    [pyz] = [name for name in archive.toc if name.endswith(".pyz")]
    return list(archive.open_embedded_archive(pyz).toc)


def test_the_bundle_leaves_out_the_development_tools(bundle: Path) -> None:
    """flynn_host.dev (throwaway daemons and clusters, the busybox test image) is not part of
    the program: the spec excludes it, and nothing in the program imports it
    (tests/test_layout.py)."""
    modules = set(bundled_modules(bundle))
    assert {"flynn_host.daemon", "flynn_host.runtime.runc"} <= modules  # the program's are read
    assert sorted(m for m in modules if m.split(".")[:2] == ["flynn_host", "dev"]) == []


@needs_root
def test_version(bundle: Path) -> None:
    out = run_frozen(bundle, "version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"{__version__}\n", "")


@needs_root
@pytest.mark.needs("strace")
def test_frozen_program_opens_nothing_of_the_development_setup(bundle: Path, tmp_path: Path):
    """Traced without hiding anything: the bundle never even looks at the virtualenv, the
    system's Python or the source tree (`help daemon` imports the daemon, aiohttp included)."""
    for args in (["version"], ["help", "daemon"]):
        trace = tmp_path / "trace"
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace),
                        str(bundle), *args], env=host_env(), cwd="/", capture_output=True,
                       check=True)  # fmt: skip
        text = trace.read_text()
        assert str(bundle.parent / "_internal") in text  # it did trace the program's opens
        for forbidden in (*HIDDEN, str(ROOT)):
            assert f'"{forbidden}' not in text, (args, forbidden)


@needs_root
def test_job_through_the_frozen_daemon(frozen: FrozenDaemon) -> None:
    job_id = frozen.new_job_id()
    frozen.client.add_job(busybox_job(job_id, ["sh", "-c", "echo hi; exit 3"]))
    final = frozen.wait_job(job_id)
    assert (final["status"], final["exit_status"], final["error"]) == ("crashed", 3, None)
    log = frozen.cli("log", job_id)
    assert (log.returncode, log.stdout) == (0, "hi\n"), log.stderr
    ps = frozen.cli("ps", "--all")
    assert ps.returncode == 0 and job_id in ps.stdout, ps.stderr
    # the daemon really ran with the source tree (and the virtualenv) hidden
    assert frozen.in_namespace("ls", "-A", str(ROOT / "flynn_host")).stdout == ""


@needs_root
def test_component_job_runs_from_the_frozen_bundle(frozen: FrozenDaemon) -> None:
    """The bundle needs only glibc: a job from the plain `base` image (no Python in it) runs
    the ping component from the bundle mounted at /.flynn-host."""
    manifest = IMAGES / "base" / "manifest.json"
    if not manifest.exists():
        pytest.fail(f"{manifest} is missing: run `make images` first")
    image = frozen.client.request(
        "POST", "/host/images", {"manifest_url": manifest.as_uri(), "name": "base"}
    )
    port = free_port()
    job_id = frozen.new_job_id()
    frozen.client.add_job(
        {
            "id": job_id,
            "partition": "system",
            "mountspecs": image["mountspecs"],
            "config": {
                "args": ["/.flynn-host/flynn-host", "component", "ping", "--port", str(port)],
                "host_bundle": True,
                "host_network": True,
            },
        }
    )
    frozen.wait_job(job_id, ("running",))
    deadline = time.monotonic() + 30
    while True:
        try:
            url = f"http://127.0.0.1:{port}/.well-known/status"
            with urllib.request.urlopen(url) as resp:
                status = json.loads(resp.read())["data"]
            break
        except OSError:
            assert time.monotonic() < deadline, frozen.cli("log", job_id).stdout
            time.sleep(0.1)
    assert status["status"] == "healthy"
    assert status["detail"]["hostname"] == job_id.split("-", 1)[1]
    frozen.client.stop_job(job_id)
    assert frozen.wait_job(job_id)["status"] == "done"


@needs_root
def test_the_controller_runs_from_the_frozen_bundle(bundle: Path) -> None:
    """`flynn-host component controller` from the bundle alone: it applies its migrations
    (package data), validates with its JSON schemas (jsonschema's own data files) and serves."""
    from flynn_host.dev.controller import pg_server

    with pg_server() as pg:
        port = devhost.free_port()
        env = host_env(**pg.env(), PORT=str(port), LISTEN_IP="127.0.0.1", AUTH_KEY="frozen-key")
        proc = subprocess.Popen(without_venv([str(bundle), "component", "controller"]),
                                env=env, cwd="/", stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Basic OmZyb3plbi1rZXk="}  # ":frozen-key"

        def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            data = json.dumps(body).encode() if body is not None else None
            req = urllib.request.Request(url + path, data=data, method=method, headers=auth)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read() or b"null")

        try:
            devhost.wait_for(
                lambda: call("GET", "/.well-known/status")[0] == 200,
                60,
                "the frozen controller",
                ignoring=(OSError,),
            )
            assert call("POST", "/apps", {"name": "frozen"})[1]["name"] == "frozen"
            status, err = call("POST", "/apps", {"name": "Not Valid"})
            assert (status, err["detail"]) == (400, {"field": "name"})
            assert "/apps" in call("GET", "/openapi.json")[1]["paths"]
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0].decode(errors="replace")
        assert "Traceback" not in out, out[-3000:]


@needs_root
def test_shims_are_the_frozen_program(frozen: FrozenDaemon) -> None:
    jobs_dir = frozen.base / "run" / frozen.host_id / "jobs"
    deadline = time.monotonic() + 10
    while len(idle := idle_shims(jobs_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(idle) == 2  # the pool (--shim-pool default 2), started from the bundle
    for pid in idle:
        assert Path(f"/proc/{pid}/exe").resolve() == frozen.exe.resolve()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert cmdline == [str(frozen.exe).encode(), b"shim", str(jobs_dir).encode(), b"--idle"]
    job_id = frozen.new_job_id()
    frozen.client.add_job(busybox_job(job_id, ["sleep", "100"]))
    frozen.wait_job(job_id, ("running",))
    shim_pid = int(next(jobs_dir.glob("*/shim.pid")).read_text())
    assert shim_pid in idle  # the job went to a pre-started shim
    # its layers are mounted in the daemon's own namespace, where the virtualenv is hidden
    assert frozen.mounts() and not mounts_under(frozen.base)
    frozen.client.stop_job(job_id)
    assert frozen.wait_job(job_id)["exit_status"] == 128 + 15


@needs_root
@pytest.mark.parametrize("given", [None, "/opt/fh-given-lib"])
def test_children_get_the_environment_the_program_was_given(
    make_frozen: Any, tmp_path: Path, given: str | None
) -> None:
    """runc, started by the daemon (list, delete) and by the frozen shim (run), is a wrapper
    that records its environment: LD_LIBRARY_PATH is what the daemon was given (or absent)
    and no bootloader variable leaks."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    runc = wrappers / "runc"
    real = shutil.which("runc", path=MINIMAL_PATH)
    # written aside and renamed, so the test never reads half a record
    runc.write_text(f'#!/bin/sh\n{{ echo "$*"; env; }} > {tmp_path}/part.$$\n'
                    f'mv {tmp_path}/part.$$ {tmp_path}/runc-env.$$\n'
                    f'exec {real} "$@"\n')  # fmt: skip
    runc.chmod(0o755)
    env = {"PATH": f"{wrappers}:{MINIMAL_PATH}", "FH_MARK": "given"}
    if given:
        env["LD_LIBRARY_PATH"] = given
    d = make_frozen(**env)
    job_id = d.new_job_id()
    d.client.add_job(busybox_job(job_id, ["true"]))
    assert d.wait_job(job_id)["status"] == "done"
    records: list[list[str]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the daemon deletes the container after the exit
        records = [p.read_text().splitlines() for p in tmp_path.glob("runc-env.*")]
        commands = {word for r in records for word in r[0].split()}
        if {"run", "list", "delete"} <= commands:
            break
        time.sleep(0.1)
    # `run` comes from the shim, `list` (at start-up) and `delete` from the daemon
    assert {"run", "list", "delete"} <= commands, records
    for args, *lines in records:
        child = dict(line.split("=", 1) for line in lines if "=" in line)
        assert child["FH_MARK"] == "given"
        assert child.get("LD_LIBRARY_PATH") == given, args
        assert not [k for k in child if k.startswith("_PYI") or k.endswith("_ORIG")], args


@needs_root
def test_plugins_lists_the_builtins(frozen: FrozenDaemon) -> None:
    """Every built-in plugin is in the bundle, with the hooks it has in the source tree."""
    source = make_plugin_manager(load_entrypoints=False)
    expected = {p["name"]: p["hooks"] for p in list_plugins(source)}
    assert set(expected) == set(BUILTIN_PLUGINS)
    plugins = {p["name"]: p for p in frozen.client.plugins()}
    for name, hooks in expected.items():
        assert (plugins[name]["source"], plugins[name]["hooks"]) == ("built-in", hooks)
    out = frozen.cli("plugins")
    assert out.returncode == 0, out.stderr
    assert {line.split()[0] for line in out.stdout.splitlines()[1:]} >= set(BUILTIN_PLUGINS)


# --- flynn_host.frozen, without a bundle --------------------------------------------------------


@pytest.fixture
def pretend_frozen(monkeypatch: pytest.MonkeyPatch) -> str:
    """sys as PyInstaller's bootloader leaves it; returns the bundle's _internal directory."""
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", "/opt/fh/_internal", raising=False)
    monkeypatch.setattr(sys, "executable", "/opt/fh/flynn-host")
    return "/opt/fh/_internal"


BOOTLOADER_ENV = {
    "_PYI_ARCHIVE_FILE": "/opt/fh/flynn-host",
    "_PYI_PARENT_PROCESS_LEVEL": "-1",
    "_PYI_LINUX_PROCESS_NAME": "flynn-host",
    "PATH": "/usr/bin:/bin",
}


def test_restore_environment_from_source_changes_nothing() -> None:
    env = {"LD_LIBRARY_PATH": "/x", "LD_LIBRARY_PATH_ORIG": "/y", **BOOTLOADER_ENV}
    frozen_mod.restore_environment(env)
    assert env == {"LD_LIBRARY_PATH": "/x", "LD_LIBRARY_PATH_ORIG": "/y", **BOOTLOADER_ENV}
    assert not frozen_mod.is_frozen()
    assert frozen_mod.self_command() == [sys.executable, "-m", "flynn_host.cli.main"]


def test_restore_environment_puts_back_a_given_library_path(pretend_frozen: str) -> None:
    env = {"LD_LIBRARY_PATH": f"{pretend_frozen}:/usr/local/lib",
           "LD_LIBRARY_PATH_ORIG": "/usr/local/lib", **BOOTLOADER_ENV}  # fmt: skip
    frozen_mod.restore_environment(env)
    assert env == {"LD_LIBRARY_PATH": "/usr/local/lib", "PATH": "/usr/bin:/bin"}
    frozen_mod.restore_environment(env)  # idempotent
    assert env == {"LD_LIBRARY_PATH": "/usr/local/lib", "PATH": "/usr/bin:/bin"}


def test_restore_environment_removes_the_bundles_library_path(pretend_frozen: str) -> None:
    env = {"LD_LIBRARY_PATH": pretend_frozen, **BOOTLOADER_ENV}
    frozen_mod.restore_environment(env)
    assert env == {"PATH": "/usr/bin:/bin"}
    assert frozen_mod.is_frozen()
    assert frozen_mod.self_command() == ["/opt/fh/flynn-host"]


def test_frozen_daemons_boot_a_two_host_cluster(bundle: Path, monkeypatch: Any) -> None:
    """The bundle as every host's daemon (`FLYNN_HOST_BIN`): `init`, `bootstrap` and the
    discoverd and flannel jobs run the frozen program (mounted at /.flynn-host), and a job on
    host 1 reaches a job on host 2 by `<service>.discoverd`."""
    from flynn_host.dev.cluster import leftovers
    from tests.dev.test_cluster import new_cluster
    from tests.test_multihost import register, run_job, web_job

    monkeypatch.setenv("FLYNN_HOST_BIN", str(bundle))
    c = new_cluster()
    try:
        c.up(2, bootstrap=True, host_id_prefix=f"{c.name}h")
        daemon = Path(f"/proc/{c.host(1).pid}/exe").resolve()
        assert daemon == bundle.resolve()
        for i in (1, 2):
            status = c.client(i).status()
            assert status["network"]["subnet"].startswith("100.100.")
            assert status["discoverd"]["url"] == f"http://{c.host(i).ip}:1111"
        ip = web_job(c, 2)["internal_ip"]
        register(c, 1, "frozenweb", f"{ip}:8080")
        assert run_job(c, 1, "wget -q -O- http://frozenweb.discoverd:8080/") == (
            0,
            f"hello from {ip}\n",
        )
    finally:
        c.down()
        assert leftovers(c) == []
