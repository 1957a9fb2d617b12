"""`flynn provider` and `flynn resource`: resource providers of the cluster, and the
resources an app has from them (provisioning one sets the app's environment from it)."""

from __future__ import annotations

from typing import Any

from flynn_cli.context import Context
from flynn_cli.env import set_env
from flynn_cli.output import TabWriter, log

Args = dict[str, Any]

PROVIDER_USAGE = """
usage: flynn provider
       flynn provider add <name> <url>

Manage resource providers associated with the controller.

Commands:
    With no arguments, displays current providers

    add  creates a new provider <name> at <url>
"""

RESOURCE_USAGE = """
usage: flynn resource
       flynn resource add <provider>
       flynn resource remove <provider> <resource>

Manage resources for the app.

Commands:
       With no arguments, shows a list of resources.

       add     provisions a new resource for the app using <provider>.
       remove  removes the existing <resource> provided by <provider>.
"""


def run_provider(args: Args, ctx: Context) -> None:
    if args["add"]:
        ctx.client.create_provider({"name": args["<name>"], "url": args["<url>"]})
        log(f"Created provider {args['<name>']}.")
        return
    providers = ctx.client.provider_list()
    if not providers:
        return
    with TabWriter() as w:
        w.row("ID", "NAME", "URL")
        for p in providers:
            w.row(p.get("id", ""), p.get("name", ""), p.get("url", ""))


def run_resource(args: Args, ctx: Context) -> None:
    if args["add"]:
        run_resource_add(args, ctx)
    elif args["remove"]:
        run_resource_remove(args, ctx)
    else:
        app = ctx.app()
        client = ctx.client
        resources = client.app_resource_list(app)
        with TabWriter() as w:
            w.row("ID", "Provider ID", "Provider Name")
            for r in resources:
                provider = client.get_provider(r.get("provider", ""))
                w.row(r.get("id", ""), r.get("provider", ""), provider.get("name", ""))


def run_resource_add(args: Args, ctx: Context) -> None:
    app = ctx.app()
    res = ctx.client.provision_resource(args["<provider>"], [app])
    env: dict[str, str | None] = dict(res.get("env") or {})
    release_id = set_env(ctx, "", env)
    log(f"Created resource {res.get('id', '')} and release {release_id}.")


def run_resource_remove(args: Args, ctx: Context) -> None:
    app = ctx.app()
    client = ctx.client
    res = client.delete_resource(args["<provider>"], args["<resource>"])
    release = client.app_release(app)
    release_env = release.get("env") or {}
    res_env = res.get("env") or {}
    # unset only the variables the app still has as the resource set them
    env: dict[str, str | None] = {k: None for k, v in res_env.items() if release_env.get(k) == v}
    release_id = set_env(ctx, "", env)
    log(f"Deleted resource {res.get('id', '')}, created release {release_id}.")
