"""Git, as the CLI uses it: an app's git URL (`<GitURL>/<app>.git`), finding the app (and
its cluster) from the current repository's remotes, adding and removing the `flynn` remote,
and the hidden `flynn git-credentials` helper git calls for the controller key.

Every git command runs with an argument list in the current directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from flynn_cli.config import Cluster, Config
from flynn_cli.output import CommandError, log, prompt_yes_no

GIT_URL_SUFFIX = ".git"


def git_url(cluster: Cluster, app: str) -> str:
    return f"{cluster.git_url}/{app}{GIT_URL_SUFFIX}"


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True)
    except FileNotFoundError:
        # no git installed: as if not in a repository
        return subprocess.CompletedProcess(["git", *args], 127, "", "git: not found")


def in_git_repo() -> bool:
    return _git("rev-parse", "--git-dir").returncode == 0


def remote_names() -> list[str]:
    proc = _git("remote")
    if proc.returncode != 0:
        raise CommandError(proc.stderr.strip() or "git remote failed")
    return proc.stdout.split()


def add_remote(name: str, url: str) -> None:
    """Replace (or create) remote `name` with `url`."""
    _git("remote", "remove", name)
    _git("remote", "add", "--", name, url)


def remove_remote(name: str) -> None:
    _git("remote", "remove", name)


def prompt_replace_remote(remote: str) -> bool:
    """False when remote `remote` exists and the user does not want it replaced."""
    if remote in remote_names():
        print("There is already a git remote called", remote, flush=True)
        if not prompt_yes_no("Are you sure you want to replace it?"):
            log(
                "The remote was not created. Please declare the desired local git remote "
                "name with --remote flag."
            )
            return False
    return True


# --------------------------------------------------------------------------------------------
# finding the app


@dataclass
class RemoteApp:
    cluster: Cluster
    name: str


def app_from_git_url(url: str, config: Config, only_cluster: str = "") -> RemoteApp | None:
    """The app a git URL points at: `<GitURL>/<app>.git` of a configured cluster."""
    for c in config.clusters:
        if only_cluster and c.name != only_cluster:
            continue
        if not c.git_url:
            continue
        prefix = c.git_url + "/"
        if url.startswith(prefix) and url.endswith(GIT_URL_SUFFIX):
            name = url[len(prefix) : len(url) - len(GIT_URL_SUFFIX)]
            if name:
                return RemoteApp(c, name)
    return None


def git_remotes(config: Config, only_cluster: str = "") -> dict[str, RemoteApp] | None:
    """The remotes whose push URL is a Flynn app's; None when not in a git repository."""
    proc = _git("remote", "-v")
    if proc.returncode != 0:
        return None
    found: dict[str, RemoteApp] = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) != 3 or fields[2] != "(push)":
            continue
        app = app_from_git_url(fields[1], config, only_cluster)
        if app is not None:
            found[fields[0]] = app
    return found


def remote_from_git_config() -> str:
    """`git config flynn.remote`: the remote to take the app from, if set."""
    proc = _git("config", "flynn.remote")
    return proc.stdout.strip() if proc.returncode == 0 else ""


class NoRepo(Exception):
    """Not in a git repository (so no app from its remotes)."""


def app_from_git_remote(remote: str, config: Config, only_cluster: str = "") -> RemoteApp:
    """The app of remote `remote`, or of the only Flynn remote when `remote` is empty."""
    if remote:
        proc = _git("config", f"remote.{remote}.url")
        if proc.returncode != 0:
            if proc.returncode == 1:
                raise CommandError(f"could not find git remote {remote} in {os.getcwd()}")
            raise CommandError(proc.stderr.strip() or f"git config exited {proc.returncode}")
        app = app_from_git_url(proc.stdout.strip(), config, only_cluster)
        if app is None:
            raise CommandError(f"could not find app name in {remote} git remote")
        return app
    remotes = git_remotes(config, only_cluster)
    if remotes is None:
        raise NoRepo()
    if len(remotes) > 1:
        raise CommandError(
            "error: Multiple apps listed in git remotes, please specify one with the global -a "
            "option to disambiguate.\n\nAvailable Flynn remotes:\n" + "\n".join(sorted(remotes))
        )
    for app in remotes.values():
        return app
    raise CommandError("no apps in git remotes")


# --------------------------------------------------------------------------------------------
# flynn git-credentials

GIT_CREDENTIALS_USAGE = "usage: flynn git-credentials <operation>"


def run_git_credentials(args: dict[str, object], config: Config) -> None:
    """Answer git's `get` with the controller key of the cluster serving that git host.

    Beyond the 2015 CLI (https only), an `http://` GitURL is answered for `protocol=http`,
    for clusters this project runs without TLS.
    """
    if args["<operation>"] != "get":
        return
    details: dict[str, str] = {}
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line:
            break
        k, sep, v = line.partition("=")
        if sep:
            details[k] = v
    protocol = details.get("protocol", "")
    if protocol not in ("https", "http"):
        return
    host = details.get("host", "")
    url = f"{protocol}://{host}"
    for c in config.clusters:
        if c.git_url == url:
            sys.stdout.write(f"protocol={protocol}\nusername=user\nhost={host}\npassword={c.key}\n")
            return
