"""gitreceive's hooks: the `gitreceive` platform component (git's smart HTTP, the app
repositories kept in the blobstore) and `gitreceive-hook` (the pre-receive hook that builds
and deploys a push to master, run by `git receive-pack`)."""

from __future__ import annotations

from collections.abc import Callable

from flynn_host.plugins.hookspecs import hookimpl


def _main(argv: list[str]) -> int:
    from flynn_gitreceive.service import main

    return main(argv)


def _hook(argv: list[str]) -> int:
    from flynn_gitreceive.receiver import main

    return main(argv)


@hookimpl
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    return {"gitreceive": _main, "gitreceive-hook": _hook}
