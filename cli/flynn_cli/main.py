"""`flynn`: the command-line client of a Flynn cluster's controller, compatible with the 2015
Go CLI (same commands, usage texts, flags, output and `~/.flynnrc`).

The global usage is parsed first (`-a <app>`, `-c <cluster>`, the command, its arguments);
then the command's own usage text is parsed with docopt, as the Go CLI did, and the command
runs. A command's failure prints its message on stderr and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docopt
from flynn_controller.client import ControllerError

from flynn_cli import (
    apps,
    cluster,
    env,
    gitremote,
    limit,
    logs,
    pg,
    release,
    resource,
    route,
    run,
    scale,
)
from flynn_cli.context import Context
from flynn_cli.output import CommandError, Exit

try:
    from flynn_host import __version__
except ImportError:  # the CLI alone, without the host package
    __version__ = "dev"

USAGE = """
usage: flynn [-a <app>] [-c <cluster>] <command> [<args>...]

Options:
	-a <app>
	-c <cluster>
	-h, --help

Commands:
	help        show usage for a specific command
	cluster     manage clusters
	create      create an app
	delete      delete an app
	apps        list apps
	info        show app information
	ps          list jobs
	kill        kill a job
	log         get app log
	scale       change formation
	run         run a job
	env         manage env variables
	limit       manage resource limits
	meta        manage app metadata
	route       manage routes
	pg          manage postgres database
	provider    manage resource providers
	remote      manage git remotes
	resource    provision a new resource
	release     manage app releases
	deployment  list deployments
	export      export app data
	import      create app from exported data
	version     show flynn version

See 'flynn help <command>' for more information on a specific command.
"""[1:]

VERSION_USAGE = """
usage: flynn version

Show flynn version string.
"""

# commands of the 2015 CLI that come with later issues
NOT_YET = ("export", "import")


@dataclass
class Command:
    usage: str
    run: Callable[[dict[str, Any], Context], None]
    hidden: bool = False


def _run_version(args: dict[str, Any], ctx: Context) -> None:
    print(__version__)


def _run_git_credentials(args: dict[str, Any], ctx: Context) -> None:
    try:
        config = ctx.config
    except CommandError:
        return  # an unreadable flynnrc: git gets no answer, as from the Go CLI
    gitremote.run_git_credentials(args, config)


COMMANDS: dict[str, Command] = {
    "apps": Command(apps.APPS_USAGE, apps.run_apps),
    "cluster": Command(cluster.CLUSTER_USAGE, cluster.run_cluster),
    "create": Command(apps.CREATE_USAGE, apps.run_create),
    "delete": Command(apps.DELETE_USAGE, apps.run_delete),
    "deployment": Command(release.DEPLOYMENT_USAGE, release.run_deployment),
    "env": Command(env.ENV_USAGE, env.run_env),
    "git-credentials": Command(gitremote.GIT_CREDENTIALS_USAGE, _run_git_credentials, hidden=True),
    "info": Command(apps.INFO_USAGE, apps.run_info),
    "kill": Command(scale.KILL_USAGE, scale.run_kill),
    "limit": Command(limit.LIMIT_USAGE, limit.run_limit),
    "log": Command(logs.LOG_USAGE, logs.run_log),
    "meta": Command(env.META_USAGE, env.run_meta),
    "pg": Command(pg.PG_USAGE, pg.run_pg),
    "provider": Command(resource.PROVIDER_USAGE, resource.run_provider),
    "ps": Command(scale.PS_USAGE, scale.run_ps),
    "release": Command(release.RELEASE_USAGE, release.run_release),
    "remote": Command(apps.REMOTE_USAGE, apps.run_remote),
    "resource": Command(resource.RESOURCE_USAGE, resource.run_resource),
    "route": Command(route.ROUTE_USAGE, route.run_route),
    "run": Command(run.RUN_USAGE, run.run_run),
    "scale": Command(scale.SCALE_USAGE, scale.run_scale),
    "version": Command(VERSION_USAGE, _run_version),
}


def _fail(msg: str) -> int:
    print(msg, file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # `flynn ... | head`: the reader left; say nothing more
        sys.stderr.close()
        return 1


def _main(argv: list[str]) -> int:
    try:
        top = docopt.docopt(USAGE, argv, default_help=True, version=__version__, options_first=True)
    except SystemExit as e:
        return _exit_code(e)
    name: str = top["<command>"]
    cmd_args: list[str] = list(top["<args>"])

    if name == "help":
        if not cmd_args:
            print(USAGE)
            return 0
        name, cmd_args = cmd_args[0], ["--help"]

    if name in NOT_YET:
        return _fail(f"'{name}' is not available in this version yet")
    command = COMMANDS.get(name)
    if command is None:
        return _fail(f"{name} is not a flynn command. See 'flynn help'")

    try:
        args = docopt.docopt(command.usage.strip("\n"), [name, *cmd_args], default_help=True)
    except SystemExit as e:
        return _exit_code(e)

    try:
        ctx = Context(top["-a"] or "", top["-c"] or "")
        command.run(dict(args), ctx)
    except Exit as e:
        return e.status
    except (CommandError, ControllerError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


def _exit_code(e: SystemExit) -> int:
    """docopt's exits: a usage error (a message: printed on stderr, 1) or help (0)."""
    if e.code is None or isinstance(e.code, int):
        return int(e.code or 0)
    # docopt-ng prefixes a warning the Go CLI does not print; the usage is what helps
    lines = [ln for ln in str(e.code).splitlines() if not ln.startswith("Warning: found")]
    print("\n".join(lines), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
