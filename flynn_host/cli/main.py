"""`flynn-host`: the daemon and the operator's commands, with Flynn's usage texts
(README.md#using-flynn-host).

Every command but `daemon` is a client of a host API (the local one by default; set
`FLYNN_HOST_ADDR=ip:port` to talk to another). Errors print a message and exit non-zero: one
line for what a user can cause (a bad argument, an image or job that does not exist, a host
that does not answer), handled here for every command; a traceback only for a bug.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flynn_host import __version__
from flynn_host.cli.usage import Parser, UsageError

USAGE = """\
usage: flynn-host [-h|--help] [--version] <command> [<args>...]

Commands:
    help       show usage for a specific command
    init       create the host config file (/etc/flynn/host.json)
    daemon     start the daemon
    bootstrap  bootstrap the cluster's services (Layer 0) from a manifest
    ps         list jobs
    log        get the logs of a job
    inspect    get low-level information about a job
    stop       stop running jobs
    signal     signal a job
    run        run a job on a host
    image      import, list and garbage-collect images
    list       list the cluster's hosts (from discoverd)
    discover   show a service's instances (from discoverd)
    component  run a platform component (inside its job)
    plugins    list the plugins of the daemon
    version    show current version

See 'flynn-host help <command>' for more information on a specific command.
"""


def commands() -> dict[str, Callable[[list[str]], int]]:
    from flynn_host.cli import bootstrap, daemon, discover, init, jobs, run

    return {
        "init": init.cmd_init,
        "daemon": daemon.cmd_daemon,
        "bootstrap": bootstrap.cmd_bootstrap,
        "ps": jobs.cmd_ps,
        "log": jobs.cmd_log,
        "inspect": jobs.cmd_inspect,
        "stop": jobs.cmd_stop,
        "signal": jobs.cmd_signal,
        "run": run.cmd_run,
        "plugins": jobs.cmd_plugins,
        "image": jobs.cmd_image,
        "list": discover.cmd_list,
        "discover": discover.cmd_discover,
        "version": cmd_version,
        "component": cmd_component,
        "shim": cmd_shim,
    }


VERSION_USAGE = """\
usage: flynn-host version [--release]

Options:
  --release   print the release version

Show current version.
"""


def cmd_version(argv: list[str]) -> int:
    p = Parser(VERSION_USAGE)
    p.add_argument("--release", action="store_true")
    p.parse(argv)
    # Flynn prints its build's version string, or with --release the release the build
    # belongs to; a build of this project carries nothing beyond its release, so both print
    # `__version__`
    print(__version__)
    return 0


COMPONENT_USAGE = """\
usage: flynn-host component <name> [<args>...]

Run a platform component (a plugin's service) in the foreground. This is what component jobs
run, from the host's own program mounted at /.flynn-host: /.flynn-host/flynn-host component ...
"""


def cmd_component(argv: list[str]) -> int:
    from flynn_host.plugins.manager import make_plugin_manager

    if not argv or argv[0] in ("-h", "--help"):
        print(COMPONENT_USAGE, end="")
        return 0 if argv else 2
    table: dict[str, Callable[[list[str]], int]] = {}
    for batch in make_plugin_manager().hook.flynn_host_platform_components():
        table.update(batch or {})
    name, rest = argv[0], argv[1:]
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        print(f"flynn-host component: no component named {name!r} (available: {known})",
              file=sys.stderr)  # fmt: skip
        return 1
    return table[name](rest)


def cmd_shim(argv: list[str]) -> int:
    """Internal: the per-job shim (the daemon runs it; listed nowhere)."""
    from flynn_host.runtime.shim.__main__ import main as shim_main

    return shim_main(argv)


def plugin_commands() -> dict[str, Callable[[list[str]], int]]:
    from flynn_host.plugins.manager import make_plugin_manager

    out: dict[str, Callable[[list[str]], int]] = {}
    try:
        pm = make_plugin_manager()
    except Exception:
        return out
    for batch in pm.hook.flynn_host_commands():
        out.update(batch or {})
    return out


def main(argv: list[str] | None = None) -> int:
    from flynn_host.frozen import restore_environment

    restore_environment()  # children get the environment we were given (no-op from source)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 1
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    table = commands()
    if name == "help":
        if not rest:
            print(USAGE, end="")
            return 0
        name, rest = rest[0], ["--help"]
    func = table.get(name) or plugin_commands().get(name)
    if func is None:
        print(f"flynn-host: '{name}' is not a flynn-host command. See 'flynn-host help'.",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        return func(rest)
    except UsageError as exc:
        print(f"flynn-host {name}: {exc}", file=sys.stderr, end="")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"flynn-host {name}: {exc}", file=sys.stderr)
        return 1


def is_user_error(exc: BaseException) -> bool:
    """Errors a command's input or the host's answer cause, which get a one-line message: bad
    values (ValueError), files and hosts that are not there (OSError, ConnectionError), Flynn
    errors raised here (an image not found) or by the host API, a refused attach."""
    from flynn_host.client import HostAPIError
    from flynn_host.errors import FlynnError
    from flynn_host.runtime.attach import AttachError

    return isinstance(exc, (ValueError, OSError, FlynnError, HostAPIError, AttachError))


if __name__ == "__main__":
    sys.exit(main())
