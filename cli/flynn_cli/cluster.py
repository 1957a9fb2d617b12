"""`flynn cluster`: the clusters in `~/.flynnrc` (list, add, remove, default).

`cluster add` takes a domain (`https://controller.<domain>`, git at `https://git.<domain>`)
or a controller URL: an `https://…` URL is used verbatim as the 2015 CLI did, and — this
project's extension for clusters without TLS — so is an `http://…` URL, whose git URL is then
`http://git.<host>` (a leading `controller.` of the host dropped) unless `--git-url` says
otherwise. Unless `--no-git`, it fetches the cluster CA (`GET /ca-cert`, with the key and the
pin), saves it as `~/.flynn/ca-certs/<name>.pem` and configures git globally for the git URL.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.parse
from typing import Any

from flynn_cli import config as cfg
from flynn_cli.context import Context, cluster_client
from flynn_cli.output import CommandError, TabWriter, go_quote, log

Args = dict[str, Any]

# (the long lines of the 2015 text are joined from pieces, to keep the source narrow)
CLUSTER_USAGE = (
    """
usage: flynn cluster
       flynn cluster add [-f] [-d] [--git-url <giturl>] [--no-git] [-p <tlspin>] """
    """<cluster-name> <domain> <key>
       flynn cluster remove <cluster-name>
       flynn cluster default [<cluster-name>]
       flynn cluster migrate-domain <domain>
       flynn cluster backup [--file <file>]

Manage Flynn clusters.


Commands:
    With no arguments, shows a list of configured clusters.

    add
        Adds <cluster-name> to the ~/.flynnrc configuration file.

        options:
            -f, --force               force add cluster
            -d, --default             set as default cluster
            --git-url=<giturl>        git URL
            --no-git                  skip git configuration
            -p, --tls-pin=<tlspin>    SHA256 of the cluster's TLS cert

        <domain> may also be the controller's URL (https://... or, for a cluster
        without TLS, http://...).

    remove
        Removes <cluster-name> from the ~/.flynnrc configuration file.

    default
        With no arguments, prints the default cluster. With <cluster-name>, sets
        the default cluster.

    migrate-domain
        Migrates the cluster's base domain from the current one to <domain>.
        (not supported yet)

    backup
        Takes a backup of the cluster. (not supported yet)

        options:
            --file=<backup-file>  file to write backup to (defaults to stdout)

Examples:

	$ flynn cluster add -p KGCENkp53YF5OvOKkZIry71+czFRkSw2ZdMszZ/0ljs= default """
    """dev.localflynn.com e09dc5301d72be755a3d666f617c4600
	Cluster "default" added.
"""
)


def run_cluster(args: Args, ctx: Context) -> None:
    if args["add"]:
        run_cluster_add(args, ctx)
    elif args["remove"]:
        run_cluster_remove(args, ctx)
    elif args["default"]:
        run_cluster_default(args, ctx)
    elif args["migrate-domain"]:
        raise CommandError("'cluster migrate-domain' is not supported yet")
    elif args["backup"]:
        raise CommandError("'cluster backup' is not supported yet")
    else:
        with TabWriter() as w:
            w.row("NAME", "CONTROLLER URL", "GIT URL")
            for c in ctx.config.clusters:
                row = [c.name, c.controller_url, c.git_url or "(none)"]
                if c.name == ctx.config.default:
                    row.append("(default)")
                w.row(*row)


def cluster_urls(domain: str, git_url: str | None) -> tuple[str, str]:
    """The controller and git URLs `cluster add` derives from its <domain> argument."""
    if domain.startswith("http://"):
        controller = domain.rstrip("/")
        host = urllib.parse.urlsplit(controller).netloc
        host = host.removeprefix("controller.")
        return controller, git_url or f"http://git.{host}"
    if domain.startswith("https://"):
        controller = domain.rstrip("/")
        host = urllib.parse.urlsplit(controller).netloc.removeprefix("controller.")
        return controller, git_url or f"https://git.{host}"
    return f"https://controller.{domain}", git_url or f"https://git.{domain}"


def flynn_executable() -> str:
    """The absolute path of this `flynn`, for git's credential helper."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "flynn"
    if argv0.endswith(".py") or argv0 == "-c":
        found = shutil.which("flynn")
        if found:
            return os.path.abspath(found)
    if os.sep not in argv0:
        argv0 = shutil.which(argv0) or argv0
    return os.path.abspath(argv0)


def run_cluster_add(args: Args, ctx: Context) -> None:
    controller_url, git_url = cluster_urls(args["<domain>"], args["--git-url"])
    cluster = cfg.Cluster(
        name=args["<cluster-name>"],
        key=args["<key>"],
        tls_pin=args["--tls-pin"] or "",
        controller_url=controller_url,
        git_url=git_url,
    )
    config = ctx.config
    config.add(cluster, force=bool(args["--force"]))
    set_default = bool(args["--default"]) or len(config.clusters) == 1
    if set_default and not config.set_default(cluster.name):
        raise CommandError(
            f"Cluster {go_quote(cluster.name)} does not exist and cannot be set as default."
        )
    if not args["--no-git"]:
        if shutil.which("git") is None:
            raise CommandError(
                "Executable 'git' was not found. Use --no-git to skip git configuration"
            )
        try:
            pem = cluster_client(cluster).ca_cert()
        except Exception as e:
            raise CommandError(f"Error writing CA certificate: {e}") from None
        ca_path = cfg.write_ca_cert(cluster.name, pem)
        cfg.write_global_git_config(cluster.git_url, ca_path, flynn_executable())
    config.save()
    if set_default:
        log(f"Cluster {go_quote(cluster.name)} added and set as default.")
    else:
        log(f"Cluster {go_quote(cluster.name)} added.")


def run_cluster_remove(args: Args, ctx: Context) -> None:
    name = args["<cluster-name>"]
    config = ctx.config
    removed = config.remove(name)
    if removed is None:
        return
    msg = f"Cluster {go_quote(name)} removed."
    if config.default == name and config.clusters:
        config.set_default(config.clusters[0].name)
        msg = (
            f"Cluster {go_quote(name)} removed and {go_quote(config.default)} "
            "is now the default cluster."
        )
    config.save()
    if removed.git_url:
        cfg.remove_global_git_config(removed.git_url)
    log(msg)


def run_cluster_default(args: Args, ctx: Context) -> None:
    name = args["<cluster-name>"]
    config = ctx.config
    if not name:
        with TabWriter() as w:
            w.row("NAME", "URL")
            for c in config.clusters:
                if c.name == config.default:
                    w.row(c.name, c.controller_url, "(default)")
                    break
        return
    if not config.set_default(name):
        raise CommandError(f"Cluster {go_quote(name)} does not exist and cannot be set as default.")
    config.save()
    log(f"{go_quote(name)} is now the default cluster.")
