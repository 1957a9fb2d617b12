"""The node's settings and the Patroni configuration they render to: the issue's measured
settings, the two modes, and a clear error for each wrong setting."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import pytest
from flynn_postgres import service
from flynn_postgres.types import (
    EXTENSIONS,
    NodeSettings,
    SettingsError,
    etcd_hosts_from,
    patroni_config,
)


def settings(**kw: object) -> NodeSettings:
    base = NodeSettings(
        name="node-1",
        data_dir=Path("/data"),
        etcd_hosts=["127.0.0.1:2379"],
        superuser_password="su-secret",
        replication_password="repl-secret",
        listen_ip="100.100.1.5",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_strict_mode_renders_the_measured_settings() -> None:
    conf = patroni_config(settings())
    dcs = conf["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (10, 1, 4)
    assert dcs["synchronous_mode"] is True
    assert dcs["synchronous_mode_strict"] is True
    assert dcs["synchronous_node_count"] == 1
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["postgresql"]["parameters"]["wal_keep_size"] == "1GB"
    assert dcs["postgresql"]["parameters"]["wal_retrieve_retry_interval"] == "1s"
    assert "data-checksums" in conf["bootstrap"]["initdb"]
    assert conf["scope"] == "postgres" and conf["name"] == "node-1"
    assert conf["etcd3"]["hosts"] == ["127.0.0.1:2379"]
    assert conf["restapi"]["listen"] == "100.100.1.5:8008"
    # changing the cluster through Patroni's API takes the superuser's password
    assert conf["restapi"]["authentication"] == {"username": "patroni", "password": "su-secret"}
    pg = conf["postgresql"]
    assert pg["listen"] == pg["connect_address"] == "100.100.1.5:5432"
    assert pg["bin_dir"] == "/usr/lib/postgresql/15/bin"
    assert pg["data_dir"] == "/data/pgdata"
    assert pg["authentication"]["superuser"]["password"] == "su-secret"
    assert pg["authentication"]["replication"]["password"] == "repl-secret"
    assert "host replication replicator 100.100.0.0/16 scram-sha-256" in pg["pg_hba"]
    assert "host all all 100.100.0.0/16 scram-sha-256" in pg["pg_hba"]
    # nothing from anywhere else, and no password-less network access
    assert not [r for r in pg["pg_hba"] if "0.0.0.0/0" in r or "trust" in r]
    # a new standby's copy does not wait for a spread checkpoint
    assert pg["basebackup"] == [{"checkpoint": "fast"}]


def test_available_mode_lets_a_primary_go_on_alone() -> None:
    dcs = patroni_config(settings(mode="available"))["bootstrap"]["dcs"]
    assert dcs["synchronous_mode"] is True
    assert dcs["synchronous_mode_strict"] is False


def test_every_node_loads_the_extension_allow_list() -> None:
    conf = patroni_config(settings())
    # local parameters: Patroni applies them over the cluster's on every node's start
    params = conf["postgresql"]["parameters"]
    assert params["local_preload_libraries"] == "pgextwlist"
    assert params["extwlist.extensions"].split(",") == list(EXTENSIONS)
    assert params["unix_socket_directories"] == "/data/patroni"
    # not the cluster-wide ones, which only a new cluster's first node writes
    dcs_params = conf["bootstrap"]["dcs"]["postgresql"]["parameters"]
    assert "local_preload_libraries" not in dcs_params


def test_the_extension_list_is_the_seeds_that_debian_packages() -> None:
    assert len(EXTENSIONS) == len(set(EXTENSIONS)) == 26
    assert {"hstore", "postgis", "postgis_topology", "pgrouting", "uuid-ossp"} <= set(EXTENSIONS)
    # chkpass left PostgreSQL in 11; Debian packages no plv8
    assert not {"chkpass", "plv8"} & set(EXTENSIONS)
    # nothing that reads the server's files or needs a superuser to be safe
    assert not {"adminpack", "file_fdw", "plpython3u"} & set(EXTENSIONS)
    # pgextwlist reads the list as comma separated names: none may hold a comma or a space
    assert all(re.fullmatch(r"[a-z0-9_-]+", name) for name in EXTENSIONS)


@pytest.mark.skipif(
    not Path("/usr/share/postgresql/15/extension").is_dir(), reason="PostgreSQL 15 not installed"
)
def test_every_listed_extension_is_installed() -> None:
    """The packages `make dev` and the postgres image install hold each one."""
    ext_dir = Path("/usr/share/postgresql/15/extension")
    assert [e for e in EXTENSIONS if not (ext_dir / f"{e}.control").is_file()] == []
    assert Path("/usr/lib/postgresql/15/lib/plugins/pgextwlist.so").is_file()


def test_scope_ports_and_networks_are_settings() -> None:
    conf = patroni_config(
        settings(scope="pg-two", port=6543, api_port=9008, networks=["10.0.0.0/8"])
    )
    assert conf["scope"] == "pg-two"
    assert conf["postgresql"]["listen"] == "100.100.1.5:6543"
    assert conf["restapi"]["connect_address"] == "100.100.1.5:9008"
    assert "host all all 10.0.0.0/8 scram-sha-256" in conf["postgresql"]["pg_hba"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "fast"}, "mode 'fast'"),
        ({"scope": "Post_gres"}, "scope 'Post_gres'"),
        ({"name": ""}, "name ''"),
        ({"data_dir": Path("data")}, "absolute path"),
        ({"listen_ip": "localhost"}, "not an IP address"),
        ({"port": 0}, "port 0"),
        ({"api_port": 5432}, "both 5432"),
        ({"etcd_hosts": []}, "no etcd endpoints"),
        ({"etcd_hosts": ["127.0.0.1"]}, "expected host:port"),
        ({"etcd_hosts": ["127.0.0.1:x"]}, "expected host:port"),
        ({"superuser_password": ""}, "POSTGRES_SUPERUSER_PASSWORD"),
        ({"replication_password": ""}, "POSTGRES_REPLICATION_PASSWORD"),
        ({"networks": ["10.0.0.1/8"]}, "network '10.0.0.1/8'"),
    ],
)
def test_wrong_settings_are_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        patroni_config(settings(**change))


def test_etcd_endpoints_parse() -> None:
    assert etcd_hosts_from("http://10.0.0.1:2379/, 10.0.0.2:2379,") == [
        "10.0.0.1:2379",
        "10.0.0.2:2379",
    ]
    with pytest.raises(SettingsError, match="only http://"):
        etcd_hosts_from("https://10.0.0.1:2379")


def test_config_is_written_0600_for_the_server_user(tmp_path: Path) -> None:
    s = settings(data_dir=tmp_path / "vol")
    path = service.prepare(s, uid=os.getuid(), gid=os.getgid())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.pgdata.stat().st_mode) == 0o700
    # JSON is YAML: Patroni reads it as its config
    assert json.loads(path.read_text()) == patroni_config(s)


@pytest.mark.parametrize(
    ("files", "refused"),
    [
        ({}, None),
        ({"patroni/patroni.yml": "", "pgdata/PG_VERSION": "15"}, None),
        ({"lost+found/": None}, None),
        ({"notes.txt": "x"}, "holds no postgres node (found notes.txt)"),
        ({"PG_VERSION": "15", "base/": None}, "found PG_VERSION, base"),
        ({"pgdata/something": "x"}, "not a PostgreSQL data directory"),
    ],
)
def test_a_foreign_volume_is_refused(
    tmp_path: Path, files: dict[str, str | None], refused: str | None
) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    for name, text in files.items():
        p = vol / name
        if text is None:
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    s = settings(data_dir=vol)
    if refused is None:
        service.check_volume(s)
    else:
        with pytest.raises(service.VolumeError, match=re.escape(refused)):
            service.check_volume(s)
