"""The plugin manager: built-in plugins registered explicitly (entry points vanish in a frozen
program), third-party ones from the `flynn.plugins` entry-point group, some disabled by name,
and the choice of one implementation per component kind.
"""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

from flynn_host import __version__
from flynn_host.plugins import hookspecs
from flynn_host.plugins.hookspecs import Component

ENTRY_POINT_GROUP = "flynn.plugins"

# name -> module; registered exactly as a vendor's plugin would be.
BUILTIN_PLUGINS: dict[str, str] = {
    "runc": "flynn_host.plugins.runc",
    "directory-volumes": "flynn_host.plugins.directory_volumes",
    "logmux": "flynn_host.plugins.logmux",
    "ping": "flynn_ping.plugin",
    "discoverd": "flynn_discoverd.plugin",
    "flannel": "flynn_flannel.plugin",
    "postgres": "flynn_postgres.plugin",
    "controller": "flynn_controller.plugin",
    "router": "flynn_router.plugin",
    "blobstore": "flynn_blobstore.plugin",
    "gitreceive": "flynn_gitreceive.plugin",
    "logaggregator": "flynn_logaggregator.plugin",
    "bootstrap-actions": "flynn_host.plugins.bootstrap_actions",
}


class PluginError(Exception):
    pass


def make_plugin_manager(
    disabled: list[str] | tuple[str, ...] = (), load_entrypoints: bool = True
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    for name, module in BUILTIN_PLUGINS.items():
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(module), name=name)
    if load_entrypoints:
        # setuptools entry points: name = plugin name, value = module (or object)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    # a hookimpl whose name matches no spec (a misspelt hook) fails here, at start-up
    pm.check_pending()
    return pm


def _version_of(pm: pluggy.PluginManager, plugin: object) -> str:
    for plug, dist in pm.list_plugin_distinfo():
        if plug is plugin:
            return str(dist.version)
    version = getattr(plugin, "__version__", None)
    return str(version) if version else __version__


def list_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """What `GET /plugins` and `flynn-host plugins` show: name, version, source and hooks."""
    out = []
    dists = {id(p): d for p, d in pm.list_plugin_distinfo()}
    for name, plugin in sorted(pm.list_name_plugin()):
        if plugin is None:  # blocked
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = dists.get(id(plugin))
        out.append(
            {
                "name": name,
                "version": _version_of(pm, plugin),
                "source": f"{dist.project_name}" if dist else "built-in",
                "hooks": hooks,
            }
        )
    return out


def choose_components(
    pm: pluggy.PluginManager, config: Any, choices: dict[str, str]
) -> dict[str, Component]:
    """Pick one implementation per component kind: the configured one, else the default.

    Raises PluginError naming the kind when a configured implementation does not exist or two
    plugins claim the default of one kind.
    """
    offered: dict[str, list[Component]] = {}
    for batch in pm.hook.flynn_host_components(config=config):
        for comp in batch or []:
            offered.setdefault(comp.kind, []).append(comp)
    chosen: dict[str, Component] = {}
    for kind, comps in offered.items():
        want = choices.get(kind)
        if want:
            match = [c for c in comps if c.name == want]
            if not match:
                names = ", ".join(sorted(c.name for c in comps))
                raise PluginError(f"no {kind} implementation named {want!r} (available: {names})")
            chosen[kind] = match[0]
            continue
        defaults = [c for c in comps if c.default]
        if len(defaults) > 1:
            names = ", ".join(c.name for c in defaults)
            raise PluginError(f"several default {kind} implementations ({names}): choose one")
        if not defaults:
            names = ", ".join(sorted(c.name for c in comps))
            raise PluginError(
                f"no default {kind} implementation is loaded: choose one of {names} "
                f"with --component {kind}=NAME"
            )
        chosen[kind] = defaults[0]
    for kind in choices:
        if kind not in offered:
            raise PluginError(f"no plugin offers a component of kind {kind!r}")
    return chosen
