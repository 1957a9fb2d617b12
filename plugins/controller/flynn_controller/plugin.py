"""controller's hooks: the platform components `controller` (the API server, process `web` of
the controller app), `controller-scheduler` (process `scheduler`) and `controller-worker` (the
task worker: deployments, app deletions; process `worker`), and the bootstrap actions
`add-app`, `add-provider` and `scheduler`."""

from __future__ import annotations

from collections.abc import Callable

from flynn_host.plugins.hookspecs import hookimpl


def _main(argv: list[str]) -> int:
    from flynn_controller.service import main

    return main(argv)


def _scheduler(argv: list[str]) -> int:
    from flynn_controller.scheduler_service import main

    return main(argv)


def _worker_main(argv: list[str]) -> int:
    from flynn_controller.worker import main

    return main(argv)


@hookimpl
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    return {
        "controller": _main,
        "controller-scheduler": _scheduler,
        "controller-worker": _worker_main,
    }


@hookimpl
def flynn_host_bootstrap_actions() -> dict[str, type]:
    from flynn_controller import bootstrap, bootstrap_deploy

    return {
        "add-app": bootstrap.AddApp,
        "add-provider": bootstrap.AddProvider,
        "scheduler": bootstrap.StartScheduler,
        "deploy-app": bootstrap_deploy.DeployApp,
        "add-route": bootstrap_deploy.AddRoute,
    }
