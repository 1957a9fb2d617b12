"""Built-in plugin: the runc container backend (`container_backend` = `runc`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flynn_host.plugins.hookspecs import Component, Host, hookimpl

if TYPE_CHECKING:
    from flynn_host.backend import ContainerBackend
    from flynn_host.config import HostConfig


def _make_backend(host: Host) -> ContainerBackend:
    from flynn_host.runtime.runc import RuncBackend

    return RuncBackend(host.config, host.layers)


@hookimpl
def flynn_host_components(config: HostConfig) -> list[Component]:
    return [
        Component(
            kind="container_backend",
            name="runc",
            factory=_make_backend,
            default=True,
            description="OCI containers with runc over overlayfs of squashfs layers",
        )
    ]
