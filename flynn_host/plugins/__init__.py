"""The plugin system: the hook specs (`hookspecs`), the plugin manager (`manager`) and the
host's own built-in plugins, and — here, in one place — the modules of `flynn_host` a plugin
may import.

A plugin depends on the host's public surface and nothing else, so the rest of `flynn_host`
can be moved and reshaped without breaking a plugin. Of another plugin, a plugin imports only
`flynn_<name>.client` and `flynn_<name>.types`. `tests/test_plugins.py` checks both rules over
every package in `plugins/` (their tests may import anything); see `plugins/README.md`.
"""

from __future__ import annotations

# module -> why a plugin may import it. When one of these moves, change it here (and its
# importers): the test fails on an entry that no longer names a module.
PUBLIC_MODULES: dict[str, str] = {
    "flynn_host": "`__version__`: the version a component reports is its host's",
    "flynn_host.plugins.hookspecs": (
        "`hookimpl`, `Component` and `Host` (what hooks get): what a plugin implements"
    ),
    "flynn_host.errors": "`FlynnError`, `ValidationError`, `not_found`: Flynn's error JSON",
    "flynn_host.httphelper": (
        "the error middleware, bounded JSON bodies and the SSE writer every aiohttp API shares"
    ),
    "flynn_host.client": (
        "the host API's client, key and address: a component's job talks to its host"
    ),
    "flynn_host.pgmigrate": (
        "numbered SQL migrations under an advisory lock (the controller's and the blobstore's)"
    ),
    "flynn_host.atomicfile": "files replaced atomically (flannel's subnet.env)",
    "flynn_host.runtime.volumes": (
        "`VolumeManager`, the base class a `volumes` component may extend"
    ),
    "flynn_host.bootstrap": (
        "`Action`, `State`, `StepError`: what a plugin's bootstrap action is built from"
    ),
    "flynn_host.bootstrap.services": (
        "calling a cluster service by its discoverd name from a bootstrap action (the "
        "controller's `add-app`)"
    ),
    "flynn_host.bootstrap.runapp": (
        "`RunApp`: the controller's `scheduler` step starts the scheduler's jobs as `run-app` "
        "starts any app's"
    ),
    "flynn_host.runtime.images": (
        "Flynn's image manifest (layer type, platform, image id): gitreceive makes a slug "
        "app's image from slugrunner's"
    ),
    "flynn_host.runtime.attach": (
        "Flynn's attach frames and the host's attach handshake: the controller proxies an "
        "attached one-off job to its host"
    ),
    "flynn_host.frozen": (
        "`self_command`: how to run `flynn-host` itself, frozen or not (the router starts its "
        "worker processes as `flynn-host component router-worker`)"
    ),
    "flynn_host.networking.links": (
        "network namespaces and netlink (`iproute_in`): flannel's VXLAN device lives beside "
        "the host's bridge, in the host's namespace or a test host's, reached the same way"
    ),
}
