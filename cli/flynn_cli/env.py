"""`flynn env` and `flynn meta`: an app's environment (a new release, deployed, for every
change) and its metadata (a field of the app itself)."""

from __future__ import annotations

from typing import Any

from flynn_controller.client import Client, NotFound

from flynn_cli.context import Context
from flynn_cli.output import CommandError, TabWriter, go_quote, log, sorted_items
from flynn_cli.release import release_body

Args = dict[str, Any]

ENV_USAGE = """
usage: flynn env [-t <proc>]
       flynn env set [-t <proc>] <var>=<val>...
       flynn env unset [-t <proc>] <var>...
       flynn env get [-t <proc>] <var>

Manage app environment variables.

Options:
	-t, --process-type <proc>  set or read env for specified process type

Commands:
	With no arguments, shows a list of environment variables.

	set    sets value of one or more env variables
	unset  deletes one or more variables
	get    returns the value of variable

Examples:

	$ flynn env set FOO=bar BAZ=foobar
	Created release 5058ae7964f74c399a240bdd6e7d1bcb.

	$ flynn env
	BAZ=foobar
	FOO=bar

	$ flynn env get FOO
	bar

	$ flynn env unset FOO
	Created release b1bbd9bc76d6436ea2fd245300bce72e.
"""

META_USAGE = """
usage: flynn meta
       flynn meta set <var>=<val>...
       flynn meta unset <var>...

Manage metadata for an application.

Examples:

	$ flynn meta
	KEY  VALUE
	foo  bar

	$ flynn meta set foo=baz bar=qux

	$ flynn meta unset foo
"""


def run_env(args: Args, ctx: Context) -> None:
    proc = args["--process-type"] or ""
    if args["set"]:
        env: dict[str, str | None] = {}
        for pair in args["<var>=<val>"]:
            k, sep, v = pair.partition("=")
            if not sep:
                raise CommandError(f"invalid var format: {go_quote(pair)}")
            env[k] = v
        log(f"Created release {set_env(ctx, proc, env)}.")
        return
    if args["unset"]:
        log(f"Created release {set_env(ctx, proc, dict.fromkeys(args['<var>']))}.")
        return
    if args["get"]:
        run_env_get(args["<var>"][0], proc, ctx)
        return
    app = ctx.app()
    try:
        release = ctx.client.app_release(app)
    except NotFound:
        return
    env = dict(release.get("env") or {})
    if proc:
        env.update(((release.get("processes") or {}).get(proc) or {}).get("env") or {})
    for k, v in sorted_items(env):
        print(f"{k}={v}")


def run_env_get(var: str, proc: str, ctx: Context) -> None:
    app = ctx.app()
    try:
        release = ctx.client.app_release(app)
    except NotFound:
        raise CommandError("no app release found") from None
    processes = release.get("processes") or {}
    if proc and proc not in processes:
        raise CommandError(f"process type {go_quote(proc)} not found in release {release['id']}")
    env = release.get("env") or {}
    if var in env:
        print(env[var])
        return
    proc_env = (processes.get(proc) or {}).get("env") or {}
    if var in proc_env:
        print(proc_env[var])
        return
    raise CommandError(f"var {go_quote(var)} not found in release {go_quote(release['id'])}")


def set_env(ctx: Context, proc: str, env: dict[str, str | None]) -> str:
    """A new release of the app with `env` applied (None unsets), deployed; its id."""
    app = ctx.app()
    return set_app_env(ctx.client, app, proc, env)


def set_app_env(client: Client, app: str, proc: str, env: dict[str, str | None]) -> str:
    try:
        release = client.app_release(app)
    except NotFound:
        release = {"processes": {proc: {}}} if proc else {}
    if proc:
        processes = release.setdefault("processes", {}) or {}
        release["processes"] = processes
        if proc not in processes:
            raise CommandError(
                f"process {go_quote(proc)} in release {release.get('id', '')} not found"
            )
        ptype = processes[proc] = dict(processes[proc] or {})
        dest = ptype.setdefault("env", {}) or {}
        ptype["env"] = dest
    else:
        dest = release.get("env") or {}
        release["env"] = dest
    for k, v in env.items():
        if v is None:
            dest.pop(k, None)
        else:
            dest[k] = v
    release.pop("id", None)
    created = client.create_release(release_body(release))
    client.deploy_app_release(app, created["id"])
    return str(created["id"])


def run_meta(args: Args, ctx: Context) -> None:
    name = ctx.app()
    client = ctx.client
    app = client.get_app(name)
    meta = dict(app.get("meta") or {})
    if args["set"]:
        for pair in args["<var>=<val>"]:
            k, sep, v = pair.partition("=")
            if not sep:
                raise CommandError(f"invalid var format: {go_quote(pair)}")
            meta[k] = v
    elif args["unset"]:
        for k in args["<var>"]:
            meta.pop(k, None)
    else:
        with TabWriter() as w:
            w.row("KEY", "VALUE")
            for k, v in sorted_items(meta):
                w.row(k, v)
        return
    client.update_app_meta(app_body({**app, "meta": meta}))


def app_body(app: dict[str, Any]) -> dict[str, Any]:
    """An App as Go's `ct.App` marshals it: `meta` always, the rest only when set."""
    body: dict[str, Any] = {}
    for k in ("id", "name", "meta", "strategy", "release", "deploy_timeout"):
        if k == "meta" or app.get(k):
            body[k] = app.get(k)
    for k in ("created_at", "updated_at"):
        if app.get(k):
            body[k] = app[k]
    return body
