"""`flynn create`, `delete`, `apps`, `info` and `remote add`: an app's life and its git
remote."""

from __future__ import annotations

from typing import Any

from flynn_controller.client import NotFound

from flynn_cli import gitremote
from flynn_cli.context import Context
from flynn_cli.output import TabWriter, go_quote, log, prompt_yes_no

Args = dict[str, Any]

CREATE_USAGE = """
usage: flynn create [-r <remote>] [-y] [<name>]

Create an application in Flynn.

If a name is not provided, a random name will be generated.

If run from a git repository, a 'flynn' remote will be created or replaced that
allows deploying the application via git.

Options:
	-r, --remote=<remote>  Name of git remote to create, empty string for none. [default: flynn]
	-y, --yes              Skip the confirmation prompt if the git remote already exists.

Examples:

	$ flynn create
	Created turkeys-stupefy-perry
"""

DELETE_USAGE = """
usage: flynn delete [-y] [-r <remote>]

Delete an app.

If run from a git repository with a 'flynn' remote for the app, it will be
removed.

Options:
	-r, --remote=<remote>  Name of git remote to delete, empty string for none. [default: flynn]
	-y, --yes              Skip the confirmation prompt.

Examples:

	$ flynn -a turkeys-stupefy-perry delete
	Are you sure you want to delete the app "turkeys-stupefy-perry"? (yes/no): yes
	Deleted turkeys-stupefy-perry (removed 1 routes, deprovisioned 0 resources)
"""

APPS_USAGE = """
usage: flynn apps

List all apps.

Examples:

	$ flynn apps
	ID                                NAME
	f1e85f5392454a329929e3f27f7a5644  gitreceive
	4c6325c1f13547059e5496c91a6a97dd  router
"""

INFO_USAGE = """
usage: flynn info

Show information for an app.

Examples:

	$ flynn info
	=== example
	Git URL:  https://git.dev.localflynn.com/example.git
	Web URL:  http://example.dev.localflynn.com
"""

REMOTE_USAGE = """
usage: flynn remote add [<remote>] [-y]

Create a git remote that allows deploying the application via git.
If a name for the remote is not provided 'flynn' will be used.

Options:
	-y, --yes              Skip the confirmation prompt if the git remote already exists.

Examples:

	$ flynn -a turkeys-stupefy-perry remote add
	Created remote flynn with url https://git.dev.localflynn.com/turkeys-stupefy-perry.git

	$ flynn -a turkeys-stupefy-perry remote add staging
	Created remote staging with url https://git.dev.localflynn.com/turkeys-stupefy-perry.git
"""


def run_create(args: Args, ctx: Context) -> None:
    remote = args["--remote"] or ""
    in_repo = gitremote.in_git_repo()
    if in_repo and not args["--yes"] and not gitremote.prompt_replace_remote(remote):
        return
    body: dict[str, Any] = {}
    if args["<name>"]:
        body["name"] = args["<name>"]
    body["meta"] = None  # Go's App.meta has no omitempty
    app = ctx.client.create_app(body)
    if in_repo and remote:
        gitremote.add_remote(remote, gitremote.git_url(ctx.cluster, app["name"]))
    log(f"Created {app['name']}")


def run_delete(args: Args, ctx: Context) -> None:
    name = ctx.app()
    remote = args["--remote"] or ""
    if not args["--yes"] and not prompt_yes_no(
        f"Are you sure you want to delete the app {go_quote(name)}?"
    ):
        return
    res = ctx.client.delete_app(name)
    if remote:
        remotes = gitremote.git_remotes(ctx.config)
        if remotes and remote in remotes and remotes[remote].name == name:
            gitremote.remove_remote(remote)
    routes = len(res.get("deleted_routes") or [])
    resources = len(res.get("deleted_resources") or [])
    log(f"Deleted {name} (removed {routes} routes, deprovisioned {resources} resources)")


def run_apps(args: Args, ctx: Context) -> None:
    apps = ctx.client.app_list()
    with TabWriter() as w:
        w.row("ID", "NAME")
        for a in apps:
            w.row(a.get("id", ""), a.get("name", ""))


def run_info(args: Args, ctx: Context) -> None:
    name = ctx.app()
    client = ctx.client
    print("===", name, flush=True)
    with TabWriter() as w:
        try:
            release = client.app_release(name)
        except NotFound:
            release = None
        if release is None or (release.get("env") or {}).get("SLUG_URL"):
            w.row("Git URL:", gitremote.git_url(ctx.cluster, name))
        try:
            routes = client.route_list(name)
        except Exception:  # the Go CLI shows what it has when routes cannot be listed
            routes = []
        for r in routes:
            if r.get("type") == "http":
                protocol = "https" if r.get("tls_cert") else "http"
                w.row("Web URL:", f"{protocol}://{r.get('domain', '')}")
                break


def run_remote(args: Args, ctx: Context) -> None:
    name = ctx.app()
    app = ctx.client.get_app(name)
    remote = args["<remote>"] or "flynn"
    if not gitremote.in_git_repo():
        log("Must be executed within a git repository.")
        return
    # the 2015 CLI parses -y but asks anyway; here -y does what it says
    if not args["--yes"] and not gitremote.prompt_replace_remote(remote):
        return
    url = gitremote.git_url(ctx.cluster, app["name"])
    gitremote.add_remote(remote, url)
    log(f"Created remote {remote} with url {url}.")
