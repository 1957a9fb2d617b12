"""Plugins: the plugin manager on its own, a third-party plugin distribution installed for real
(`tests/plugins/flynn-tmpfs-volumes`, built with pip into a throw-away directory and put on the
daemon's PYTHONPATH) replacing the `volumes` component of a real daemon, the start-up errors
an operator can cause, `docs/plugin_hooks.md` and `plugins/README.md` kept in step with the
hook specs and the plugins, and the import rule over every package in `plugins/`."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from flynn_host import __version__
from flynn_host.client import HostAPIError
from flynn_host.plugins import PUBLIC_MODULES, hookspecs
from flynn_host.plugins.hookspecs import Component, hookimpl
from flynn_host.plugins.manager import (
    BUILTIN_PLUGINS,
    PluginError,
    choose_components,
    list_plugins,
    make_plugin_manager,
)

from .conftest import ROOT, Daemon, busybox_job, needs_root

PLUGIN_SRC = ROOT / "tests" / "plugins" / "flynn-tmpfs-volumes"
DOCS = ROOT / "docs" / "plugin_hooks.md"
TMPFS_HOOKS = [
    "flynn_host_components",
    "flynn_host_http_apps",
    "flynn_host_job_log",
    "flynn_host_services",
]


# --- the plugin manager, no daemon -------------------------------------------------------------


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Factory: `fake_dist(dist, entry_point, source)` puts an installed distribution on
    sys.path (a module plus a dist-info with a `flynn.plugins` entry point), as pip would."""
    modules: list[str] = []

    def make(dist: str, entry_point: str, source: str) -> None:
        module = dist.replace("-", "_")
        (tmp_path / f"{module}.py").write_text(inspect.cleandoc(source) + "\n")
        info = tmp_path / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[flynn.plugins]\n{entry_point} = {module}\n")
        modules.append(module)

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for module in modules:
        sys.modules.pop(module, None)


def test_builtins_are_listed_as_built_in() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    listed = {p["name"]: p for p in list_plugins(pm)}
    assert sorted(listed) == sorted(BUILTIN_PLUGINS)
    for plugin in listed.values():
        assert (plugin["version"], plugin["source"]) == (__version__, "built-in")
    assert listed["runc"]["hooks"] == ["flynn_host_components"]
    assert listed["directory-volumes"]["hooks"] == ["flynn_host_components"]
    pm = make_plugin_manager(["runc"], load_entrypoints=False)
    assert "runc" not in [p["name"] for p in list_plugins(pm)]


def test_misspelt_hook_fails_at_start_up(fake_dist: Callable[..., None]) -> None:
    fake_dist(
        "misspelt-plugin",
        "misspelt",
        """
        from flynn_host.plugins.hookspecs import hookimpl

        @hookimpl
        def flynn_host_componentz(config):
            return []
        """,
    )
    with pytest.raises(pluggy.PluginValidationError, match="flynn_host_componentz"):
        make_plugin_manager()
    # --disable-plugin is the way out: a blocked plugin is never imported
    pm = make_plugin_manager(["misspelt"])
    assert "misspelt" not in [p["name"] for p in list_plugins(pm)]


def test_entry_point_plugin_lists_its_distribution(fake_dist: Callable[..., None]) -> None:
    fake_dist(
        "flynn-hello",
        "hello",
        """
        from flynn_host.plugins.hookspecs import hookimpl

        @hookimpl
        def flynn_host_commands():
            return {"hello": lambda argv: 0}
        """,
    )
    pm = make_plugin_manager()
    (hello,) = [p for p in list_plugins(pm) if p["name"] == "hello"]
    assert hello == {
        "name": "hello",
        "version": "1.0",
        "source": "flynn-hello",
        "hooks": ["flynn_host_commands"],
    }
    assert {"hello"} <= {k for batch in pm.hook.flynn_host_commands() for k in batch}


class _Offers:
    """A plugin object offering the given components."""

    def __init__(self, *components: Component) -> None:
        self.components = list(components)

    @hookimpl
    def flynn_host_components(self, config: Any) -> list[Component]:
        return self.components


def test_choose_components() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    chosen = choose_components(pm, None, {})
    assert (chosen["container_backend"].name, chosen["volumes"].name) == ("runc", "directory")
    pm.register(_Offers(Component("volumes", "tmpfs", factory=lambda host: None)), name="t")
    assert choose_components(pm, None, {})["volumes"].name == "directory"
    assert choose_components(pm, None, {"volumes": "tmpfs"})["volumes"].name == "tmpfs"
    with pytest.raises(PluginError, match=r"'nope' \(available: directory, tmpfs\)"):
        choose_components(pm, None, {"volumes": "nope"})
    with pytest.raises(PluginError, match="kind 'network'"):
        choose_components(pm, None, {"network": "bridge"})
    pm.register(_Offers(Component("volumes", "zfs", lambda h: None, default=True)), name="z")
    with pytest.raises(PluginError, match="several default volumes") as e:
        choose_components(pm, None, {})
    assert "directory" in str(e.value) and "zfs" in str(e.value)


# --- docs/plugin_hooks.md kept honest ------------------------------------------------------------


def hook_specs() -> dict[str, list[str]]:
    """Every hook spec in hookspecs.py: name -> argument names."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: list(inspect.signature(obj).parameters)
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, marker)
    }


def doc_sections() -> dict[str, str]:
    """`### heading` -> its text up to the next heading, for the headings naming a hook."""
    text = DOCS.read_text()
    parts = re.split(r"^(#{1,3} .*)$", text, flags=re.M)
    return {
        head[4:].strip(): body
        for head, body in zip(parts[1::2], parts[2::2], strict=True)
        if head.startswith("### flynn_host_")
    }


def test_docs_have_a_heading_for_every_hook_and_none_other() -> None:
    specs = hook_specs()
    assert specs, "no hook specs found"
    documented: dict[str, list[str]] = {}
    for heading in doc_sections():
        m = re.fullmatch(r"(flynn_host_\w+)\(([\w, ]*)\)", heading)
        assert m, f"heading {heading!r}: expected '### <hook>(<arguments>)'"
        documented[m[1]] = [a.strip() for a in m[2].split(",") if a.strip()]
    missing = sorted(set(specs) - set(documented))
    unknown = sorted(set(documented) - set(specs))
    assert not missing, f"hooks without a '### <hook>(...)' heading in {DOCS.name}: {missing}"
    assert not unknown, f"headings in {DOCS.name} that name no hook: {unknown}"
    for name, args in specs.items():
        assert documented[name] == args, f"{name}: documented as {documented[name]}, is {args}"


def test_docs_say_whether_each_hook_is_firstresult() -> None:
    for heading, body in doc_sections().items():
        assert "firstresult" in body, f"### {heading}: say whether it is firstresult"


def test_hookspec_docstrings_say_whether_each_hook_is_firstresult() -> None:
    marker = f"{hookspecs.PROJECT}_spec"
    for name in hook_specs():
        spec = getattr(hookspecs, name)
        said = re.search(r"^\s*firstresult: (yes|no)\b", spec.__doc__ or "", flags=re.M)
        assert said, f"{name}: its docstring must say 'firstresult: yes' or 'firstresult: no'"
        is_first = bool(getattr(spec, marker).get("firstresult"))
        assert (said[1] == "yes") is is_first, f"{name}: the docstring says {said[0].strip()!r}"


def test_docs_name_every_builtin_component() -> None:
    text = DOCS.read_text()
    pm = make_plugin_manager(load_entrypoints=False)
    for batch in pm.hook.flynn_host_components(config=None):
        for comp in batch:
            assert f"`{comp.kind}`" in text and f"`{comp.name}`" in text, comp


def test_docs_list_every_builtin_plugin_with_its_hooks() -> None:
    rows = [line for line in DOCS.read_text().splitlines() if line.lstrip().startswith("| `")]
    pm = make_plugin_manager(load_entrypoints=False)
    for name, module in BUILTIN_PLUGINS.items():
        start = f"| `{name}` | `{module}`"
        row = next((r for r in rows if r.lstrip().startswith(start)), None)
        assert row, f"{DOCS.name}: the built-in plugins table has no row '{start} ...'"
        hooks = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or [])
        assert hooks, name
        missing = [h for h in hooks if f"`{h}`" not in row]
        assert not missing, f"{DOCS.name}: the row of {name} does not name its hooks {missing}"


def test_plugins_readme_lists_every_plugin_package() -> None:
    text = (ROOT / "plugins" / "README.md").read_text()
    for package in PLUGIN_PACKAGES:  # (defined with the import rule, below)
        row = f"| `{package.parent.name}/` | `{package.name}` |"
        assert row in text, f"plugins/README.md: no row '{row} ...' in the list of plugins"


# --- the import rule: what a plugin package may import -------------------------------------------

PLUGIN_PACKAGES = sorted(p for p in (ROOT / "plugins").glob("*/flynn_*") if p.is_dir())
PLUGIN_NAMES = {p.name for p in PLUGIN_PACKAGES}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False
    except ValueError:  # imported already, with no `__spec__` (cryptography's `serialization`)
        return name in sys.modules


def imports_of(source: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import, those inside functions and `TYPE_CHECKING`
    included; `from pkg import name` imports `pkg.name` when that is a module, else `pkg`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield node.lineno, full if _is_module(full) else node.module


def import_allowed(package: str, module: str) -> bool:
    """May plugin package `package` (`flynn_discoverd`) import `module`?"""
    top, *rest = module.split(".")
    if top == package or not top.startswith("flynn_"):
        return True  # its own modules, the standard library, third-party distributions
    if top == "flynn_host":
        return module in PUBLIC_MODULES
    if top == "flynn_cli":
        return False  # the `flynn` command is a client, no plugin's business
    return rest[:1] in (["client"], ["types"])  # another plugin


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("from flynn_host import __version__", True),
        ("from flynn_host import httphelper", True),
        ("from flynn_host.errors import FlynnError", True),
        ("from flynn_discoverd.client import Client", True),
        ("from flynn_discoverd import types", True),
        ("from flynn_flannel.leases import acquire_lease", True),  # its own package
        ("import aiohttp.web", True),
        ("from flynn_host.runtime.runc import StartError", False),
        ("from flynn_host import jobs", False),
        ("def f():\n    from flynn_host.daemon import Host", False),
        ("if TYPE_CHECKING:\n    from flynn_host.config import HostConfig", False),
        ("import flynn_discoverd.server", False),
        ("from flynn_discoverd import store", False),
        ("from flynn_discoverd import Client", False),
        ("import flynn_cli.main", False),
    ],
)
def test_import_rule_checker(source: str, allowed: bool) -> None:
    assert all(import_allowed("flynn_flannel", m) for _, m in imports_of(source)) is allowed


def test_plugins_import_the_host_and_each_other_only_through_public_modules() -> None:
    assert {"flynn_discoverd", "flynn_flannel", "flynn_ping"} <= PLUGIN_NAMES
    wrong = []
    for package in PLUGIN_PACKAGES:
        for path in sorted(package.rglob("*.py")):
            for line, module in imports_of(path.read_text()):
                if not import_allowed(package.name, module):
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not wrong, (
        "a plugin imports another plugin only through its `client` and `types` modules, and "
        "flynn_host only through PUBLIC_MODULES (flynn_host/plugins/__init__.py):\n"
        + "\n".join(wrong)
    )


def test_public_modules_exist() -> None:
    gone = [name for name in PUBLIC_MODULES if not _is_module(name)]
    assert not gone, f"PUBLIC_MODULES names modules that do not exist: {gone}"


# --- a real plugin distribution in a real daemon ---------------------------------------------


def _why_no_wheels() -> str | None:
    """pip builds the plugin with the venv's own setuptools (no build isolation: no network)."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed in the venv"
    has_bdist_wheel = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    if not has_bdist_wheel and importlib.util.find_spec("wheel") is None:
        import setuptools

        return f"the venv's setuptools {setuptools.__version__} cannot build wheels"
    return None


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin distribution installed with pip into its own directory, not the venv."""
    reason = _why_no_wheels()
    if reason:
        pytest.fail(f"{reason}: add 'setuptools>=70.1' to the dev extras and run `make venv`")
    base = tmp_path_factory.mktemp("tmpfs-plugin")
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the repo
    src = base / "src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                   "__pycache__"))  # fmt: skip
    site = base / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return site


def plugin_env(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **extra}


def tmpfs_mounts(under: Path) -> dict[str, str]:
    """tmpfs mount points under `under` -> their mount options."""
    found = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype, opts = line.split()[:4]
            if fstype == "tmpfs" and point.startswith(f"{under}/"):
                found[point] = opts
    return found


def run_job(d: Daemon, args: list[str], **config: Any) -> str:
    job_id = d.new_job_id()
    d.client.add_job(busybox_job(job_id, args, **config))
    return job_id


def hook_lines(log_file: Path, job_id: str) -> list[dict[str, Any]]:
    if not log_file.exists():
        return []
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    return [e for e in entries if e["job_id"] == job_id]


@needs_root
def test_tmpfs_plugin_replaces_the_volumes_component(make_daemon, plugin_site, tmp_path):
    hook_file = tmp_path / "job-log-hook.jsonl"
    d = make_daemon(
        extra_args=["--component", "volumes=tmpfs"],
        env=plugin_env(plugin_site, FLYNN_TEST_LOG_HOOK_FILE=str(hook_file)),
    )
    vol = d.base / "vol"

    # visible: GET /plugins, `flynn-host plugins` and `flynn-host plugins --json`
    plugins = d.client.plugins()
    sources = {p["name"]: p["source"] for p in plugins}
    assert {name: sources.get(name) for name in BUILTIN_PLUGINS} == dict.fromkeys(
        BUILTIN_PLUGINS, "built-in"
    )
    (tmpfs,) = [p for p in plugins if p["name"] == "tmpfs-volumes"]
    assert tmpfs == {"name": "tmpfs-volumes", "version": "0.3.0",
                     "source": "flynn-tmpfs-volumes", "hooks": TMPFS_HOOKS}  # fmt: skip
    cli = d.run_cli("plugins")
    assert cli.returncode == 0, cli.stderr
    row = next(line.split() for line in cli.stdout.splitlines() if line.startswith("tmpfs-"))
    assert row[:3] == ["tmpfs-volumes", "0.3.0", "flynn-tmpfs-volumes"]
    assert " ".join(row[3:]) == ", ".join(TMPFS_HOOKS)
    cli = d.run_cli("plugins", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == plugins

    components = d.client.status()["components"]
    assert (components["container_backend"], components["volumes"]) == ("runc", "tmpfs")
    assert (vol / "tmpfs-service.started").exists()

    # a volume is a tmpfs mount, recorded in the plugin's own index
    info = d.client.request("POST", "/storage/providers/default/volumes", {"meta": {"a": "b"}})
    vid = info["id"]
    path = vol / "tmpfs" / vid
    assert set(info) == {"id", "type", "meta", "created_at"} and info["meta"] == {"a": "b"}
    assert tmpfs_mounts(vol) == {str(path): tmpfs_mounts(vol)[str(path)]}
    assert "size=65536k" in tmpfs_mounts(vol)[str(path)].split(",")
    assert not (vol / "data" / vid).exists()
    assert json.loads((vol / "tmpfs-volumes.json").read_text()) == {"volumes": [info]}
    assert d.client.request("GET", f"/storage/volumes/{vid}") == info
    with pytest.raises(HostAPIError) as e:
        d.client.request("POST", "/storage/providers/default/volumes", {"id": vid})
    assert (e.value.status, e.value.code) == (409, "object_exists")
    with pytest.raises(HostAPIError) as e:
        d.client.request("GET", "/storage/volumes/nope")
    assert (e.value.status, e.value.code) == (404, "not_found")
    assert d.client.request("GET", "/tmpfs-volumes/") == {"volumes": 1}

    # one job writes into the volume, the next one reads it back
    data = [{"target": "/data", "volume": vid, "writeable": True}]
    writer = run_job(d, ["sh", "-c", "echo hello-tmpfs > /data/greeting; echo wrote"],
                     volumes=data)  # fmt: skip
    assert d.wait_job(writer)["status"] == "done"
    assert (path / "greeting").read_text() == "hello-tmpfs\n"
    reader = run_job(d, ["sh", "-c", "cat /data/greeting"], volumes=data)
    assert d.wait_job(reader)["status"] == "done"
    assert [(e["s"], e["m"]) for e in hook_lines(hook_file, writer)] == [("stdout", "wrote")]
    (line,) = hook_lines(hook_file, reader)
    assert (line["s"], line["m"], line["n"]) == ("stdout", "hello-tmpfs", 1)

    # delete unmounts and removes; a volume used by a running job stays until the daemon stops
    other = d.client.request("POST", "/storage/providers/default/volumes", {"id": "scratch"})
    assert str(vol / "tmpfs" / "scratch") in tmpfs_mounts(vol)
    d.client.request("DELETE", f"/storage/volumes/{other['id']}")
    assert not (vol / "tmpfs" / "scratch").exists()
    assert list(tmpfs_mounts(vol)) == [str(path)]
    sleeper = run_job(d, ["sleep", "600"], volumes=data)
    d.wait_job(sleeper, states=("running",))

    assert d.stop() == 0
    assert not (vol / "tmpfs-service.started").exists()
    assert tmpfs_mounts(d.base) == {}
    assert not path.exists()

    # the index outlives the daemon; the contents do not (a new, empty tmpfs)
    d.start()
    assert [v["id"] for v in d.client.request("GET", "/storage/volumes")] == [vid]
    assert list(tmpfs_mounts(vol)) == [str(path)]
    assert list(path.iterdir()) == []
    assert (vol / "tmpfs-service.started").exists()
    assert d.stop() == 0
    assert tmpfs_mounts(d.base) == {}
    assert not (vol / "tmpfs-service.started").exists()
    assert " ERROR " not in d.log(), d.log()


@needs_root
def test_tmpfs_volumes_outlive_a_sigquit_restart(make_daemon, plugin_site):
    """SIGQUIT leaves jobs running for the next daemon: their tmpfs volumes stay mounted."""
    d = make_daemon(extra_args=["--component", "volumes=tmpfs"], env=plugin_env(plugin_site))
    vid = d.client.request("POST", "/storage/providers/default/volumes", {})["id"]
    path = d.base / "vol" / "tmpfs" / vid
    data = [{"target": "/data", "volume": vid, "writeable": True}]
    job_id = run_job(d, ["sh", "-c", "echo kept > /data/f; sleep 600"], volumes=data)
    d.wait_job(job_id, states=("running",))
    assert d.stop(signal.SIGQUIT) == 0
    assert list(tmpfs_mounts(d.base)) == [str(path)]
    d.start()
    assert d.client.get_job(job_id)["status"] == "running"
    assert (path / "f").read_text() == "kept\n"
    assert d.stop() == 0
    assert tmpfs_mounts(d.base) == {}


@needs_root
def test_installed_plugin_is_not_chosen_without_component_flag(make_daemon, plugin_site):
    d = make_daemon(env=plugin_env(plugin_site))
    assert "tmpfs-volumes" in [p["name"] for p in d.client.plugins()]
    assert d.client.status()["components"]["volumes"] == "directory"
    info = d.client.request("POST", "/storage/providers/default/volumes", {})
    assert (d.base / "vol" / "data" / info["id"]).is_dir()
    assert not (d.base / "vol" / "tmpfs" / info["id"]).exists()
    assert tmpfs_mounts(d.base) == {}
    assert d.client.request("GET", "/tmpfs-volumes/") == {"volumes": 0}
    # the plugin's service runs whatever provider was chosen
    assert (d.base / "vol" / "tmpfs-service.started").exists()
    assert d.stop() == 0
    assert not (d.base / "vol" / "tmpfs-service.started").exists()


def start_failing(d: Daemon, host_json: dict[str, Any] | None = None) -> str:
    """Run a daemon that must refuse to start; its exit status must be non-zero and it must
    leave no mount. Returns what it printed and logged."""
    d.write_host_config(host_json)
    env = {**os.environ, "FLYNN_HOST_CONFIG": str(d.base / "host.json"), **d.env}
    proc = subprocess.Popen(d.args(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()  # it started after all: stop it cleanly, jobs and mounts with it
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the daemon started: {out}{err}{d.log()}")
    assert proc.returncode != 0, out + err
    assert tmpfs_mounts(d.base) == {}
    return out + err + d.log()


BAD_CONFIGS = {
    "unknown-component-flag": (
        ["--component", "volumes=nope"], None, True,
        "no volumes implementation named 'nope' (available: directory, tmpfs)",
    ),
    "unknown-component-host-json": (
        [], {"plugins": {"components": {"volumes": "nope"}}}, True,
        "no volumes implementation named 'nope' (available: directory, tmpfs)",
    ),
    "chosen-plugin-disabled": (
        ["--disable-plugin", "tmpfs-volumes", "--component", "volumes=tmpfs"], None, True,
        "no volumes implementation named 'tmpfs' (available: directory)",
    ),
    "no-volumes-flag": (
        ["--disable-plugin", "directory-volumes"], None, False,
        "no plugin provides a volumes component",
    ),
    "no-volumes-host-json": (
        [], {"plugins": {"disable": ["directory-volumes", "tmpfs-volumes"]}}, True,
        "no plugin provides a volumes component",
    ),
}  # fmt: skip


@needs_root
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_plugin_config_stops_start_up(make_daemon, plugin_site, case):
    args, host_json, with_plugin, message = BAD_CONFIGS[case]
    env = plugin_env(plugin_site) if with_plugin else {}
    d = make_daemon(start=False, extra_args=args, env=env)
    assert message in start_failing(d, host_json)


@needs_root
def test_bad_plugin_config_is_a_message_not_a_traceback(make_daemon, plugin_site):
    d = make_daemon(start=False, extra_args=["--component", "volumes=nope"],
                    env=plugin_env(plugin_site))  # fmt: skip
    out = start_failing(d)
    assert "Traceback" not in out
    assert "flynn-host daemon: no volumes implementation named 'nope'" in out


@needs_root
def test_log_hook_gets_lines_of_jobs_that_end_at_once(make_daemon, plugin_site, tmp_path):
    hook_file = tmp_path / "job-log-hook.jsonl"
    d = make_daemon(env=plugin_env(plugin_site, FLYNN_TEST_LOG_HOOK_FILE=str(hook_file)))
    jobs = [run_job(d, ["echo", f"quick {i}"]) for i in range(3)]
    for job_id in jobs:
        assert d.wait_job(job_id)["status"] == "done"
    for i, job_id in enumerate(jobs):
        assert [e["m"] for e in hook_lines(hook_file, job_id)] == [f"quick {i}"]
