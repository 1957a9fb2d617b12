"""Built-in plugin: data volumes as directories under `--volpath` (`volumes` = `directory`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flynn_host.plugins.hookspecs import Component, Host, hookimpl

if TYPE_CHECKING:
    from flynn_host.config import HostConfig


def _make_volumes(host: Host) -> object:
    from flynn_host.runtime.volumes import VolumeManager

    return VolumeManager(host.config.volpath)


@hookimpl
def flynn_host_components(config: HostConfig) -> list[Component]:
    return [
        Component(
            kind="volumes",
            name="directory",
            factory=_make_volumes,
            default=True,
            description="data volumes as directories under --volpath",
        )
    ]
