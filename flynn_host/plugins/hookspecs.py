"""The hooks of flynn-host: every extension point a plugin can implement, grouped by phase.

Hooks are synchronous and cheap (pluggy cannot await): they return objects — a component
factory, an aiohttp application, an async context manager — and the daemon awaits those.
The built-in plugins (`BUILTIN_PLUGINS` in `flynn_host.plugins.manager`) implement these hooks
exactly as a vendor's plugin would; `docs/plugin_hooks.md` documents each one and a test keeps
the two in step. Each spec's docstring ends by saying whether it is firstresult (a test checks).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from flynn_host.config import HostConfig
    from flynn_host.jobs import JobManager
    from flynn_host.networking.jobnet import JobNetwork
    from flynn_host.runtime.imagestore import ImageStore
    from flynn_host.runtime.layers import LayerStore

PROJECT = "flynn"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Component:
    """One implementation of a swappable part of the host.

    `kind` names the part (`container_backend`, `volumes`, ...), `name` the implementation
    (`runc`, `directory`, ...). The host config's `components` map chooses the implementation of
    each kind; without a choice the one marked `default` wins. `factory(host)` builds it once
    the daemon's paths and stores exist.
    """

    kind: str
    name: str
    factory: Callable[[Host], Any]
    default: bool = False
    description: str = ""


class Host(Protocol):
    """What a hook gets as `host`: the daemon's `flynn_host.daemon.Host`, as far as plugins use
    it. A Protocol, so that the hooks, and the plugins implementing them, need not import the
    daemon (which imports them)."""

    @property
    def config(self) -> HostConfig: ...
    @property
    def components(self) -> dict[str, Component]: ...
    @property
    def layers(self) -> LayerStore: ...
    @property
    def images(self) -> ImageStore: ...
    @property
    def network(self) -> JobNetwork: ...
    @property
    def backend(self) -> Any: ...
    @property
    def volumes(self) -> Any: ...
    @property
    def jobs(self) -> JobManager: ...
    @property
    def keep_jobs(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def discoverd_urls(self) -> list[str] | None:
        """Where discoverd answers (this host's first), or None until the host knows."""
        ...


# --- registration: while the plugin manager is built -------------------------------------------


@hookspec
def flynn_host_components(config: HostConfig) -> list[Component]:
    """Offer component implementations.

    Fires once at start-up, before any service starts, with the host's configuration.
    Returns a list of `Component`s (may be empty). All results are collected; for each kind the
    daemon picks the implementation the host config names, else the default one.

    firstresult: no — every plugin's list is collected.
    """


# --- start-up: while the daemon starts ---------------------------------------------------------


@hookspec
def flynn_host_services(host: Host) -> list[AbstractAsyncContextManager[None]]:
    """Offer long-running services that live as long as the daemon.

    Fires once after the daemon's components exist and before the API listens. Returns async
    context managers: each is entered in plugin order and exited in reverse at shutdown (an
    `AsyncExitStack`), so start-up and clean-up are written together. A service whose entry
    fails stops the daemon's start, after the ones already entered are exited.

    firstresult: no — every plugin's services run.
    """


@hookspec
def flynn_host_http_apps(host: Host) -> list[tuple[str, web.Application]]:
    """Offer HTTP sub-applications mounted in the host API.

    Fires once while the host API is built. Returns `(prefix, app)` pairs; each app is mounted
    with `add_subapp(prefix, app)` (a prefix such as `/myplugin`, not `/host`). Errors they raise
    go through the same Flynn error JSON middleware as the host's own handlers.

    firstresult: no — every plugin's apps are mounted.
    """


# --- jobs: while jobs run ----------------------------------------------------------------------


@hookspec
def flynn_host_job_event(host: Host, event: dict[str, Any]) -> None:
    """Observe a job event.

    Fires for every event the host publishes (`create`, `start`, `stop`, `error`, `cleanup`),
    with Flynn's event JSON `{"event", "job_id", "job": ActiveJob}`. Return value is ignored.
    Must not block: queue work on the event loop if it is slow.

    firstresult: no — every implementation is called.
    """


@hookspec
def flynn_host_job_log(host: Host, job_id: str, entry: dict[str, Any]) -> None:
    """Observe one line a job wrote.

    Fires for each line of each job's stdout and stderr, in order, after it was written to the
    job's log file. `entry` is `{"n": seq, "t": RFC3339 time, "s": "stdout"|"stderr", "m": text,
    "p": true if the line had no newline}`. Delivery is at least once: after a daemon restart a
    few lines may be offered again (compare `n`). Must not block. Return value is ignored.
    The host only follows job output when at least one plugin implements this hook. A host
    that falls behind a job catches up from its log file; lines rotated out of the file before
    that are never offered (`n` jumps).

    firstresult: no — every implementation is called.
    """


# --- command line: while `flynn-host` parses its arguments -------------------------------------


@hookspec
def flynn_host_platform_components() -> dict[str, Callable[[list[str]], int]]:
    """Offer platform components: services (discoverd, flannel, router, ...) that run as jobs.

    Fires when `flynn-host component <name> [args]` starts, inside the component's job (where
    the host's own program is mounted read-only at `/.flynn-host`, so a component always runs
    the host's version). Returns a map of component name to its main function, which takes
    the remaining arguments and returns the exit status. Names must be unique.

    firstresult: no — every plugin's components are merged.
    """


@hookspec
def flynn_host_bootstrap_actions() -> dict[str, type]:
    """Offer bootstrap actions: what a step of `flynn-host bootstrap`'s manifest can do.

    Fires once when `flynn-host bootstrap` starts, before the manifest is read. Returns a map of
    action name (a step's `"action"`, e.g. `run-app`) to a class: `cls(step)` gets the step's
    JSON object and raises `flynn_host.bootstrap.StepError` for bad fields; `.run(state)` gets
    the `flynn_host.bootstrap.State` (hosts, step data, singleton flag), raises `StepError` on
    failure and returns the step's data. All results are collected; a name offered twice is an
    error.

    firstresult: no — every plugin's actions are merged.
    """


@hookspec
def flynn_host_commands() -> dict[str, Callable[[list[str]], int]]:
    """Offer extra `flynn-host` subcommands.

    Fires when `flynn-host` is given a command that is not built in. Returns a map of
    subcommand name to a function taking the remaining arguments and returning the exit status.
    A built-in command of the same name wins.

    firstresult: no — every plugin's commands are merged.
    """
