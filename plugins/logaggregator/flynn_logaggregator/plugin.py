"""logaggregator's hooks: the `logaggregator` platform component."""

from __future__ import annotations

from collections.abc import Callable

from flynn_host.plugins.hookspecs import hookimpl


def _main(argv: list[str]) -> int:
    from flynn_logaggregator.service import main

    return main(argv)


@hookimpl
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    return {"logaggregator": _main}
