"""controller's hooks: the `controller` platform component (the API server, process `web` of
the controller app) and its bootstrap actions (`add-app`, `add-provider`)."""

from __future__ import annotations

from collections.abc import Callable

from flynn_host.plugins.hookspecs import hookimpl


def _main(argv: list[str]) -> int:
    from flynn_controller.service import main

    return main(argv)


@hookimpl
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    return {"controller": _main}


@hookimpl
def flynn_host_bootstrap_actions() -> dict[str, type]:
    from flynn_controller import bootstrap

    return {"add-app": bootstrap.AddApp, "add-provider": bootstrap.AddProvider}
