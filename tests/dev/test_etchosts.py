"""A development cluster's /etc/hosts line: added, replaced and removed by cluster name,
leaving every other line as it was."""

from __future__ import annotations

from pathlib import Path

from flynn_host.dev import etchosts


def test_a_clusters_line_is_added_replaced_and_removed_alone(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    original = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost"  # no final newline
    hosts.write_text(original)
    names = etchosts.cluster_names("a.localflynn")
    assert names == ["controller.a.localflynn", "git.a.localflynn"]
    etchosts.add("a", "192.0.2.11", names, path=hosts)
    etchosts.add("b", "192.0.2.21", etchosts.cluster_names("b.localflynn"), path=hosts)
    etchosts.add("a", "192.0.2.12", names, path=hosts)  # replaces a's line
    lines = hosts.read_text().splitlines()
    assert lines[:2] == original.splitlines()
    assert [line.split("\t")[0] for line in lines[2:]] == ["192.0.2.21", "192.0.2.12"]
    assert lines[3].split("\t")[1] == "controller.a.localflynn git.a.localflynn"
    etchosts.remove("a", path=hosts)
    etchosts.remove("a", path=hosts)  # nothing there is fine
    etchosts.remove("b", path=hosts)
    assert hosts.read_text() == original + "\n"
