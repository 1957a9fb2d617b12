"""A PostgreSQL node's settings (`NodeSettings`) and the Patroni configuration they render to
(`patroni_config`, a pure function). The numbers are the issue's measured ones; each one that
is ours rather than Patroni's default says why beside it (and in docs/postgres.md)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flynn_flannel.types import DEFAULT_NETWORK

MODES = ("strict", "available")
DEFAULT_SCOPE = "postgres"
DEFAULT_PORT = 5432
# Patroni's own default REST port: every node has its job's own address, so nothing else
# on that address wants it
DEFAULT_API_PORT = 8008
BIN_DIR = "/usr/lib/postgresql/15/bin"
SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
# the user of Patroni's REST API for what changes the cluster (its password: the superuser's)
REST_USER = "patroni"
# 64 WAL segments of 16 MB: a standby away for a few minutes (a host reboot, a job restart)
# catches up by streaming instead of being re-cloned. At 3 MB/s of WAL, a busy small
# appliance, that is about 5 minutes; it costs at most 1 GB of disk beside max_wal_size.
WAL_KEEP_SIZE = "1GB"

# The seed's extensions that Debian packages for PostgreSQL 15 (contrib, PostGIS, pgRouting),
# which an app's role may `CREATE EXTENSION` through pgextwlist. Two of the seed's are missing:
# chkpass left PostgreSQL in version 11, and Debian does not package plv8
# (docs/postgres.md#extensions).
EXTENSIONS = (
    "btree_gin", "btree_gist", "citext", "cube", "dblink", "dict_int", "earthdistance",
    "fuzzystrmatch", "hstore", "intarray", "isn", "ltree", "pg_prewarm", "pg_stat_statements",
    "pg_trgm", "pgcrypto", "pgrouting", "pgrowlocks", "pgstattuple", "plpgsql", "postgis",
    "postgis_topology", "postgres_fdw", "tablefunc", "unaccent", "uuid-ossp",
)  # fmt: skip
# pgextwlist, loaded into every session: it runs `CREATE EXTENSION` of an allowed extension as
# the bootstrap superuser, then hands the session back, so app roles stay plain roles.
# local_preload_libraries looks in $libdir/plugins, where Debian installs it.
EXTENSION_PARAMETERS = {
    "local_preload_libraries": "pgextwlist",
    "extwlist.extensions": ",".join(EXTENSIONS),
}

# a discoverd service name, a Patroni scope and an etcd key segment all at once
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class SettingsError(ValueError):
    """A setting a user gave is wrong; the message says which and why."""


@dataclass(frozen=True)
class NodeSettings:
    name: str
    data_dir: Path
    etcd_hosts: list[str]
    superuser_password: str
    replication_password: str
    scope: str = DEFAULT_SCOPE
    listen_ip: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_port: int = DEFAULT_API_PORT
    mode: str = "strict"
    # where clients and standbys connect from: the cluster's job network
    networks: list[str] = field(default_factory=lambda: [DEFAULT_NETWORK])

    @property
    def pgdata(self) -> Path:
        """PostgreSQL's data directory, inside the node's volume."""
        return self.data_dir / "pgdata"

    @property
    def run_dir(self) -> Path:
        """Patroni's config, pgpass and PostgreSQL's socket: rewritten on every start."""
        return self.data_dir / "patroni"

    def validate(self) -> None:
        """Raise `SettingsError` naming the first wrong setting."""
        for what, value in (("scope", self.scope), ("name", self.name)):
            if not _NAME.match(value):
                raise SettingsError(
                    f"{what} {value!r}: use 1-63 lower-case letters, digits and '-', "
                    "starting and ending with a letter or digit"
                )
        if self.mode not in MODES:
            raise SettingsError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not self.data_dir.is_absolute():
            raise SettingsError(f"data dir {str(self.data_dir)!r}: must be an absolute path")
        try:
            ipaddress.ip_address(self.listen_ip)
        except ValueError:
            raise SettingsError(f"listen address {self.listen_ip!r}: not an IP address") from None
        for what, port in (("port", self.port), ("api port", self.api_port)):
            if not 0 < port < 65536:
                raise SettingsError(f"{what} {port}: expected 1-65535")
        if self.port == self.api_port:
            raise SettingsError(f"port and api port are both {self.port}")
        if not self.etcd_hosts:
            raise SettingsError("no etcd endpoints: give --etcd or POSTGRES_ETCD (host:port,...)")
        for host in self.etcd_hosts:
            _check_host_port(host)
        for what, password in (
            ("superuser password (POSTGRES_SUPERUSER_PASSWORD)", self.superuser_password),
            ("replication password (POSTGRES_REPLICATION_PASSWORD)", self.replication_password),
        ):
            if not password:
                raise SettingsError(f"{what}: not set")
        if not self.networks:
            raise SettingsError("no client network: give at least one CIDR")
        for net in self.networks:
            try:
                ipaddress.ip_network(net)
            except ValueError as exc:
                raise SettingsError(f"network {net!r}: {exc}") from None


def _check_host_port(host: str) -> None:
    parsed = urllib.parse.urlsplit(f"//{host}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None or "/" in host:
        raise SettingsError(f"etcd endpoint {host!r}: expected host:port")


def etcd_hosts_from(text: str) -> list[str]:
    """`--etcd`/POSTGRES_ETCD: `host:port` or `http://host:port`, comma separated."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if item.startswith("http://"):
            item = item[len("http://") :].rstrip("/")
        elif "://" in item:
            raise SettingsError(f"etcd endpoint {item!r}: only http:// is supported")
        if item:
            hosts.append(item)
    return hosts


def _pg_hba(settings: NodeSettings) -> list[str]:
    rules = [
        # Patroni and the node's own tools on its socket, as the OS user postgres
        "local all postgres peer",
        # Patroni's checks and rewinds over TCP to the node's own address
        f"host all {SUPERUSER} 127.0.0.1/32 scram-sha-256",
    ]
    for net in settings.networks:
        rules.append(f"host replication {REPLICATION_USER} {net} scram-sha-256")
        rules.append(f"host all all {net} scram-sha-256")
    return rules


def patroni_config(settings: NodeSettings) -> dict[str, Any]:
    """Patroni's configuration (what `patroni <file>` reads, as a dict) for `settings`.
    `bootstrap.dcs` is written into etcd by the first node of a new cluster only; a later
    change of `mode` has to be patched into the cluster's config (a later step)."""
    settings.validate()
    strict = settings.mode == "strict"
    ip = settings.listen_ip
    return {
        "scope": settings.scope,
        "name": settings.name,
        "restapi": {
            "listen": f"{ip}:{settings.api_port}",
            "connect_address": f"{ip}:{settings.api_port}",
            # every job on the cluster network reaches this API, and app jobs are untrusted:
            # what changes the cluster (switchover, failover, restart, PATCH /config) needs
            # the superuser's password (only reads stay open, for health checks)
            "authentication": {"username": REST_USER, "password": settings.superuser_password},
        },
        "etcd3": {"hosts": list(settings.etcd_hosts), "protocol": "http"},
        "bootstrap": {
            "dcs": {
                # the measured settings: a dead primary's key lapses within 10 s,
                # every node looks each second, and DCS trouble demotes after 4 s
                "ttl": 10,
                "loop_wait": 1,
                "retry_timeout": 4,
                # strict: a commit returns only once on the sync standby, and with none a
                # primary waits rather than acknowledge alone; available: it goes on alone
                "synchronous_mode": True,
                "synchronous_mode_strict": strict,
                "synchronous_node_count": 1,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_keep_size": WAL_KEEP_SIZE,
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_log_hints": "on",
                        "password_encryption": "scram-sha-256",
                        # a standby whose new primary refused it (its replication slot not
                        # made yet) retries in 1 s, not 5: in strict mode commits wait for it
                        "wal_retrieve_retry_interval": "1s",
                        # a primary that stops (a demotion when it lost etcd) waits for its
                        # walsenders to hand the shutdown checkpoint over; to a standby cut
                        # off by a partition that lasted wal_sender_timeout (60 s by default),
                        # all the while taking connections: 5 s bounds it
                        "wal_sender_timeout": "5s",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
        },
        "postgresql": {
            "listen": f"{ip}:{settings.port}",
            "connect_address": f"{ip}:{settings.port}",
            "data_dir": str(settings.pgdata),
            "bin_dir": BIN_DIR,
            "pgpass": str(settings.run_dir / "pgpass"),
            "authentication": {
                "superuser": {"username": SUPERUSER, "password": settings.superuser_password},
                "replication": {
                    "username": REPLICATION_USER,
                    "password": settings.replication_password,
                },
                "rewind": {"username": SUPERUSER, "password": settings.superuser_password},
            },
            # local parameters win over the cluster's (Patroni merges them last) and are
            # rewritten on every start, so every node has the extension allow-list, also one
            # joining a cluster bootstrapped before the list changed
            "parameters": {
                "unix_socket_directories": str(settings.run_dir),
                **EXTENSION_PARAMETERS,
            },
            "pg_hba": _pg_hba(settings),
            # a new standby copies the primary with pg_basebackup, which by default waits
            # for a spread checkpoint (up to most of checkpoint_timeout, 5 min): measured
            # 110 s for an idle small appliance, every node a deployment adds. `fast` asks
            # for an immediate one (a short burst of writes on the primary) and takes ~1 s
            "basebackup": [{"checkpoint": "fast"}],
        },
    }
