"""Which app and cluster a command is for (§2.2 of the 2015 map), with real git repositories:
`-a` (a remote's name or an app's), `$FLYNN_APP`, `git config flynn.remote`, the one Flynn
push remote, `-c`/`$FLYNN_CLUSTER`."""

from __future__ import annotations

import pytest
from cli_home import Home
from flynn_cli.config import Cluster, Config
from flynn_cli.context import Context
from flynn_cli.output import CommandError


@pytest.fixture
def two_clusters(private_home: Home) -> Home:
    cfg = Config(default="a")
    cfg.add(Cluster("a", "ka", "", "https://controller.a.test", "https://git.a.test"))
    cfg.add(Cluster("b", "kb", "", "http://127.0.0.1:9", "http://git.127.0.0.1:9"))
    cfg.save(private_home.flynnrc)
    return private_home


def resolve(flag_app: str = "", flag_cluster: str = "") -> tuple[str, str]:
    ctx = Context(flag_app, flag_cluster)
    app = ctx.app()
    return app, ctx.cluster.name


def test_outside_a_repository_an_app_must_be_named(two_clusters, monkeypatch):
    monkeypatch.chdir(two_clusters.path)
    with pytest.raises(CommandError) as e:
        resolve()
    assert str(e.value) == (
        "no app found, run from a repo with a flynn remote or specify one with -a"
    )
    assert resolve("web") == ("web", "a")
    assert resolve("web", "b") == ("web", "b")
    monkeypatch.setenv("FLYNN_APP", "envapp")
    monkeypatch.setenv("FLYNN_CLUSTER", "b")
    assert resolve() == ("envapp", "b")
    with pytest.raises(CommandError, match='^unknown cluster "nosuch"$'):
        resolve("web", "nosuch")


def test_the_one_flynn_remote_names_the_app_and_its_cluster(two_clusters, monkeypatch):
    repo = two_clusters.repo()
    monkeypatch.chdir(repo)
    with pytest.raises(CommandError, match="^no apps in git remotes$"):
        resolve()
    two_clusters.git("remote", "add", "origin", "https://github.com/x/y.git", cwd=repo)
    two_clusters.git("remote", "add", "flynn", "http://git.127.0.0.1:9/web.git", cwd=repo)
    # the remote's cluster wins over the default
    assert resolve() == ("web", "b")
    # -c limits the search to that cluster
    with pytest.raises(CommandError, match="no apps in git remotes"):
        resolve("", "a")


def test_several_flynn_remotes_need_disambiguation(two_clusters, monkeypatch):
    repo = two_clusters.repo()
    monkeypatch.chdir(repo)
    two_clusters.git("remote", "add", "staging", "https://git.a.test/web-staging.git", cwd=repo)
    two_clusters.git("remote", "add", "flynn", "http://git.127.0.0.1:9/web.git", cwd=repo)
    with pytest.raises(CommandError) as e:
        resolve()
    assert str(e.value) == (
        "error: Multiple apps listed in git remotes, please specify one with the global -a "
        "option to disambiguate.\n\nAvailable Flynn remotes:\nflynn\nstaging"
    )
    # -a takes a remote's name ...
    assert resolve("staging") == ("web-staging", "a")
    # ... or an app's
    assert resolve("other") == ("other", "a")
    # git config flynn.remote picks one
    two_clusters.git("config", "flynn.remote", "staging", cwd=repo)
    assert resolve() == ("web-staging", "a")
    two_clusters.git("config", "flynn.remote", "nosuch", cwd=repo)
    with pytest.raises(CommandError, match="^could not find git remote nosuch in "):
        resolve()
    two_clusters.git("remote", "add", "github", "https://github.com/x/y.git", cwd=repo)
    two_clusters.git("config", "flynn.remote", "github", cwd=repo)
    with pytest.raises(CommandError, match="^could not find app name in github git remote$"):
        resolve()


def test_only_push_urls_of_the_form_giturl_app_dot_git_count(two_clusters, monkeypatch):
    repo = two_clusters.repo()
    monkeypatch.chdir(repo)
    two_clusters.git("remote", "add", "flynn", "https://git.a.test/web", cwd=repo)  # no .git
    two_clusters.git("remote", "add", "other", "https://git.a.test.evil/web.git", cwd=repo)
    with pytest.raises(CommandError, match="no apps in git remotes"):
        resolve()
    two_clusters.git("remote", "set-url", "--push", "flynn", "https://git.a.test/web.git", cwd=repo)
    assert resolve() == ("web", "a")


def test_no_clusters_configured(private_home, monkeypatch):
    monkeypatch.chdir(private_home.path)
    ctx = Context("web")
    with pytest.raises(CommandError, match="^no clusters configured$"):
        _ = ctx.client
