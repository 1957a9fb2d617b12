"""postgres's hooks: the `postgres` platform component (a node) and `postgres-api` (the
resource provider)."""

from __future__ import annotations

from collections.abc import Callable

from flynn_host.plugins.hookspecs import hookimpl


def _main(argv: list[str]) -> int:
    from flynn_postgres.service import main

    return main(argv)


def _api_main(argv: list[str]) -> int:
    from flynn_postgres.api import main

    return main(argv)


@hookimpl
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    return {"postgres": _main, "postgres-api": _api_main}
