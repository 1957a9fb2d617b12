"""`~/.flynnrc`: read as the 2015 Go CLI wrote it (and case-insensitively), written back in
the same shape, and the rules of adding, removing and choosing the default cluster."""

from __future__ import annotations

import pytest
from flynn_cli.config import Cluster, Config
from flynn_cli.output import CommandError

# a file as the 2015 CLI (BurntSushi/toml) wrote it, after `flynn cluster add -p ...`
GO_WRITTEN = """\
default = "default"

[[cluster]]
  Name = "default"
  Key = "e09dc5301d72be755a3d666f617c4600"
  TLSPin = "KGCENkp53YF5OvOKkZIry71+czFRkSw2ZdMszZ/0ljs="
  ControllerURL = "https://controller.dev.localflynn.com"
  GitURL = "https://git.dev.localflynn.com"

[[cluster]]
  Name = "prod"
  Key = "k2"
  ControllerURL = "https://controller.prod.example.com"
  GitURL = "https://git.prod.example.com"

"""


def test_a_go_written_file_reads_and_writes_back_byte_for_byte():
    cfg = Config.parse(GO_WRITTEN)
    assert cfg.default == "default"
    first, second = cfg.clusters
    assert first == Cluster(
        name="default",
        key="e09dc5301d72be755a3d666f617c4600",
        tls_pin="KGCENkp53YF5OvOKkZIry71+czFRkSw2ZdMszZ/0ljs=",
        controller_url="https://controller.dev.localflynn.com",
        git_url="https://git.dev.localflynn.com",
    )
    assert second.tls_pin == "" and second.name == "prod"
    assert cfg.dumps() == GO_WRITTEN


def test_keys_are_read_case_insensitively_and_unknown_ones_kept():
    text = """
default = "a"
[[cluster]]
name = "a"
key = "k"
tlspin = "p"
controllerurl = "https://controller.a.test"
GITURL = "https://git.a.test"
DockerPushURL = "https://docker.a.test"
"""
    cfg = Config.parse(text)
    (c,) = cfg.clusters
    assert (c.name, c.key, c.tls_pin, c.controller_url, c.git_url) == (
        "a",
        "k",
        "p",
        "https://controller.a.test",
        "https://git.a.test",
    )
    assert c.extra == {"DockerPushURL": "https://docker.a.test"}
    again = Config.parse(cfg.dumps())
    assert again == cfg
    assert '  DockerPushURL = "https://docker.a.test"' in cfg.dumps()


def test_no_clusters_writes_an_empty_file(tmp_path):
    assert Config(default="x").dumps() == ""
    path = tmp_path / "rc"
    Config().save(path)
    assert path.read_text() == ""
    assert Config.read(tmp_path / "missing") == Config()


def test_save_and_read_round_trip(tmp_path):
    path = tmp_path / "sub" / "flynnrc"
    cfg = Config()
    cfg.add(Cluster("a", 'k"ey', "", "http://127.0.0.1:1234", "http://git.127.0.0.1:1234"))
    cfg.set_default("a")
    cfg.save(path)
    assert Config.read(path) == cfg
    assert path.stat().st_mode & 0o077 == 0  # it holds keys


def test_a_broken_file_is_a_clear_error(tmp_path):
    path = tmp_path / "rc"
    path.write_text("[[cluster]\n")
    with pytest.raises(CommandError, match=str(path)):
        Config.read(path)


def test_adding_a_conflicting_cluster_needs_force():
    cfg = Config()
    cfg.add(Cluster("a", "k", "", "https://controller.a.test", "https://git.a.test"))
    with pytest.raises(CommandError, match=r'^Cluster "a" already exists in ~/.flynnrc$'):
        cfg.add(Cluster("a", "k", "", "https://controller.b.test", "https://git.b.test"))
    with pytest.raises(CommandError, match='^A cluster with the URL "https://git.a.test" already'):
        cfg.add(Cluster("b", "k", "", "https://controller.b.test", "https://git.a.test"))
    with pytest.raises(CommandError, match='URL "https://controller.a.test" already exists'):
        cfg.add(Cluster("b", "k", "", "https://controller.a.test", "https://git.b.test"))
    cfg.add(Cluster("c", "k", "", "https://controller.c.test", "https://git.c.test"))
    with pytest.raises(CommandError, match="conflict with multiple existing clusters"):
        cfg.add(Cluster("a", "k", "", "https://controller.c.test", ""), force=True)
    cfg.add(Cluster("a", "k2", "", "https://controller.a.test", "https://git.a.test"), force=True)
    assert [(c.name, c.key) for c in cfg.clusters] == [("c", "k"), ("a", "k2")]


def test_remove_and_default():
    cfg = Config()
    cfg.add(Cluster("a", "k", "", "https://controller.a.test", ""))
    assert not cfg.set_default("nosuch")
    assert cfg.set_default("a") and cfg.default == "a"
    assert cfg.remove("nosuch") is None
    assert cfg.remove("a") is not None and cfg.clusters == []
