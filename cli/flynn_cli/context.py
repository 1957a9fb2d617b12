"""What a command runs against: the configuration, the chosen cluster and app, and a
controller client for that cluster — resolved lazily, in the 2015 CLI's order.

Cluster: `-c <cluster>`, else `$FLYNN_CLUSTER`, else the file's `default`, else its first
cluster. App: `-a <x>` (first tried as a git remote's name whose URL is a Flynn app, which also
picks the cluster), else `$FLYNN_APP`, else the remote named by `git config flynn.remote`, else
the only Flynn app among the repository's push remotes (whose cluster then wins).
"""

from __future__ import annotations

import os

from flynn_controller.client import Client, NotFound

from flynn_cli import gitremote
from flynn_cli.config import Cluster, Config
from flynn_cli.output import CommandError


class Context:
    def __init__(self, flag_app: str = "", flag_cluster: str = "") -> None:
        self.flag_cluster = flag_cluster or os.environ.get("FLYNN_CLUSTER", "")
        self._config: Config | None = None
        self._cluster: Cluster | None = None
        self._app = ""
        self._client: Client | None = None
        if flag_app:
            # `-a` may name a git remote of a Flynn app; otherwise it is the app's name
            try:
                remote = gitremote.app_from_git_remote(flag_app, self.config, self.flag_cluster)
            except (CommandError, gitremote.NoRepo):
                self._app = flag_app
            else:
                self._cluster, self._app = remote.cluster, remote.name

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = Config.read()
        return self._config

    @property
    def cluster(self) -> Cluster:
        if self._cluster is not None:
            return self._cluster
        cfg = self.config
        if not cfg.clusters:
            raise CommandError("no clusters configured")
        name = self.flag_cluster or cfg.default
        if not name:
            self._cluster = cfg.clusters[0]
            return self._cluster
        found = cfg.find(name)
        if found is None:
            raise CommandError(f'unknown cluster "{name}"')
        self._cluster = found
        return found

    def current_release_id(self, app: str) -> str | None:
        """The app's current release id; None when it has none yet (a bare 404)."""
        try:
            return self.client.app_release(app).get("id")
        except NotFound:
            return None

    def app(self) -> str:
        """The app the command is for (an error when none can be found)."""
        if self._app:
            return self._app
        env_app = os.environ.get("FLYNN_APP", "")
        if env_app:
            self._app = env_app
            return env_app
        try:
            remote = gitremote.app_from_git_remote(
                gitremote.remote_from_git_config(), self.config, self.flag_cluster
            )
        except gitremote.NoRepo:
            raise CommandError(
                "no app found, run from a repo with a flynn remote or specify one with -a"
            ) from None
        self._cluster, self._app = remote.cluster, remote.name
        return self._app

    @property
    def client(self) -> Client:
        if self._client is None:
            c = self.cluster
            self._client = cluster_client(c)
        return self._client


def cluster_client(c: Cluster) -> Client:
    try:
        return Client(c.controller_url, c.key, pin=c.tls_pin or None)
    except ValueError as e:  # a TLS pin that is not base64
        raise CommandError(f"error decoding tls pin: {e}") from None
