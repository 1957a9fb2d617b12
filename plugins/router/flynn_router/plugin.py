"""The router's hooks: the `router` platform component (the supervisor that follows the
controller and discoverd and serves the router API) and `router-worker` (one data-plane
process, started by the supervisor)."""

from __future__ import annotations

from collections.abc import Callable

from flynn_host.plugins.hookspecs import hookimpl


def _main(argv: list[str]) -> int:
    from flynn_router.service import main

    return main(argv)


def _worker(argv: list[str]) -> int:
    from flynn_router.worker import main

    return main(argv)


@hookimpl
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    return {"router": _main, "router-worker": _worker}
