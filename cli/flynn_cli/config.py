"""The CLI's local configuration: `~/.flynnrc` (or `$FLYNNRC`), a TOML file compatible with
the 2015 Go CLI's, the directory `~/.flynn/` (saved cluster CA certificates), and the global
git configuration `flynn cluster add` writes so `git push` to the cluster works.

The file holds `default = "<cluster name>"` and one `[[cluster]]` table per cluster with the
Go field names `Name`, `Key`, `TLSPin` (left out when empty), `ControllerURL`, `GitURL`. It is
read case-insensitively (as Go's TOML decoder does) and written the way BurntSushi/toml wrote
it: keys indented two spaces, an extra newline at the end, an empty file when there are no
clusters. Keys this version does not know are kept and written back.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from flynn_cli.output import CommandError, go_quote

# canonical (Go) spelling of the cluster keys, by their lower-case form
_CLUSTER_KEYS = {
    "name": "Name",
    "key": "Key",
    "tlspin": "TLSPin",
    "controllerurl": "ControllerURL",
    "giturl": "GitURL",
}


def home_dir() -> Path:
    return Path(os.path.expanduser("~"))


def flynn_dir() -> Path:
    """`~/.flynn`: saved CA certificates and other local state."""
    return home_dir() / ".flynn"


def default_path() -> Path:
    """`$FLYNNRC`, else `~/.flynnrc`."""
    env = os.environ.get("FLYNNRC")
    return Path(env) if env else home_dir() / ".flynnrc"


@dataclass
class Cluster:
    """One `[[cluster]]` of the file."""

    name: str = ""
    key: str = ""
    tls_pin: str = ""
    controller_url: str = ""
    git_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, table: dict[str, Any]) -> Cluster:
        c = cls()
        for k, v in table.items():
            canon = _CLUSTER_KEYS.get(k.lower())
            if canon is None:
                c.extra[k] = v
                continue
            setattr(c, _FIELD[canon], "" if v is None else str(v))
        return c

    def to_toml(self) -> dict[str, Any]:
        table: dict[str, Any] = {"Name": self.name, "Key": self.key}
        if self.tls_pin:
            table["TLSPin"] = self.tls_pin
        table["ControllerURL"] = self.controller_url
        table["GitURL"] = self.git_url
        table.update(self.extra)
        return table


_FIELD = {
    "Name": "name",
    "Key": "key",
    "TLSPin": "tls_pin",
    "ControllerURL": "controller_url",
    "GitURL": "git_url",
}


@dataclass
class Config:
    """The whole file: the default cluster's name and the clusters, in file order."""

    default: str = ""
    clusters: list[Cluster] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Config:
        data = tomllib.loads(text)
        cfg = cls()
        for k, v in data.items():
            if k.lower() == "default" and isinstance(v, str):
                cfg.default = v
            elif k.lower() == "cluster" and isinstance(v, list):
                cfg.clusters = [Cluster.from_toml(t) for t in v if isinstance(t, dict)]
        return cfg

    @classmethod
    def read(cls, path: Path | None = None) -> Config:
        """The configuration at `path` (default: `default_path()`); empty when missing."""
        path = path or default_path()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls()
        try:
            return cls.parse(text)
        except tomllib.TOMLDecodeError as e:
            raise CommandError(f"{path}: {e}") from None

    def dumps(self) -> str:
        if not self.clusters:
            return ""
        text = tomli_w.dumps(
            {"default": self.default, "cluster": [c.to_toml() for c in self.clusters]}
        )
        # indent the tables' keys as BurntSushi/toml did (values are single-line strings)
        lines = []
        in_table = False
        for line in text.splitlines():
            if line.startswith("[["):
                in_table = True
                lines.append(line)
            elif in_table and line:
                lines.append("  " + line)
            else:
                lines.append(line)
        return "\n".join(lines) + "\n\n"

    def save(self, path: Path | None = None) -> None:
        path = path or default_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.dumps())
        os.chmod(tmp, 0o600)  # it holds the clusters' keys
        os.replace(tmp, path)

    def find(self, name: str) -> Cluster | None:
        for c in self.clusters:
            if c.name == name:
                return c
        return None

    def add(self, cluster: Cluster, force: bool = False) -> None:
        """Add `cluster`; one with the same name, git URL or controller URL is an error
        unless `force`, which replaces it."""
        conflict = -1
        msg = ""
        for i, existing in enumerate(self.clusters):
            m = ""
            if existing.name == cluster.name:
                m = f"Cluster {go_quote(cluster.name)} already exists in ~/.flynnrc"
            elif existing.git_url and existing.git_url == cluster.git_url:
                m = (
                    f"A cluster with the URL {go_quote(cluster.git_url)} "
                    "already exists in ~/.flynnrc"
                )
            elif existing.controller_url == cluster.controller_url:
                m = (
                    f"A cluster with the URL {go_quote(cluster.controller_url)} "
                    "already exists in ~/.flynnrc"
                )
            if m:
                if conflict != -1:
                    raise CommandError(
                        "The cluster name and/or URLs conflict with multiple existing clusters."
                    )
                conflict, msg = i, m
        if msg:
            if not force:
                raise CommandError(msg)
            del self.clusters[conflict]
        self.clusters.append(cluster)

    def remove(self, name: str) -> Cluster | None:
        for i, c in enumerate(self.clusters):
            if c.name == name:
                return self.clusters.pop(i)
        return None

    def set_default(self, name: str) -> bool:
        if self.find(name) is None:
            return False
        self.default = name
        return True


# --------------------------------------------------------------------------------------------
# CA certificates and global git configuration


def ca_cert_path(name: str) -> Path:
    return flynn_dir() / "ca-certs" / f"{name}.pem"


def write_ca_cert(name: str, pem: bytes) -> Path:
    path = ca_cert_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    return path


def _git_config(*args: str) -> None:
    argv = ["git", "config", "--global", *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CommandError(
            f"error {go_quote(f'exit status {proc.returncode}')} running "
            f"{go_quote(' '.join(argv))}: {go_quote(proc.stdout + proc.stderr)}"
        )


def write_global_git_config(git_url: str, ca_file: Path, flynn_path: str) -> None:
    """Make git trust the cluster's CA for `git_url` and ask `flynn git-credentials` for the
    password (the controller key)."""
    _git_config(f"http.{git_url}.sslCAInfo", str(ca_file))
    _git_config(f"credential.{git_url}.helper", f"{flynn_path} git-credentials")


def remove_global_git_config(git_url: str) -> None:
    for section in (f"http.{git_url}", f"credential.{git_url}"):
        try:
            _git_config("--remove-section", section)
        except (CommandError, OSError):
            pass  # nothing to remove
