"""gitreceive's smart HTTP on loopback, with a real controller and blobstore and real git:
the key is required (401 with a Basic challenge, so git asks its credential helper), app names
are checked, only git's smart protocol is served, a new app's repository clones empty, and a
push that does not deploy leaves nothing behind: not the repository, not a release."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from gitreceive_proc import MAX_PUSH, GitReceive


def request(gr: GitReceive, path: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if key is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"user:{key}".encode()).decode()
    req = urllib.request.Request(gr.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def controller(gr: GitReceive, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    auth = base64.b64encode(f":{gr.key}".encode()).decode()
    req = urllib.request.Request(gr.controller.url + path, data=data, method=method,
                                 headers={"Authorization": f"Basic {auth}",
                                          "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"})
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def repo_url(gr: GitReceive, app: str, key: str | None = None) -> str:
    host = gr.url.removeprefix("http://")
    return f"http://user:{key or gr.key}@{host}/{app}.git"


def new_work_tree(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for args in (("init", "-q", "-b", "master"), ("config", "user.email", "t@example.test"),
                 ("config", "user.name", "t")):  # fmt: skip
        assert git(*args, cwd=work).returncode == 0
    (work / "index.html").write_text("hello\n")
    assert git("add", ".", cwd=work).returncode == 0
    assert git("commit", "-qm", "first", cwd=work).returncode == 0
    return work


def stored_repo(gr: GitReceive, app_id: str) -> int:
    try:
        with urllib.request.urlopen(f"{gr.blobstore.url}/repos/{app_id}.tar", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_key_is_required_and_git_is_asked_for_it(gitreceive: GitReceive) -> None:
    controller(gitreceive, "POST", "/apps", {"name": "keyed"})
    path = "/keyed.git/info/refs?service=git-upload-pack"
    for key in (None, "wrong"):
        status, headers, _ = request(gitreceive, path, key)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic")
    status, headers, body = request(gitreceive, path, gitreceive.key)
    assert status == 200, body


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        ("/Not_An_App.git/info/refs?service=git-upload-pack", 403, "Forbidden"),
        ("/no-such-app.git/info/refs?service=git-upload-pack", 404, "unknown app"),
        ("/keyed.git/info/refs", 404, "smart HTTP"),
        ("/keyed.git/HEAD", 404, "Not Found"),
    ],
)
def test_names_and_protocols(gitreceive: GitReceive, path: str, status: int, text: str) -> None:
    got, _, body = request(gitreceive, path, gitreceive.key)
    assert (got, text in body.decode()) == (status, True), body


def test_a_new_apps_repository_is_advertised_and_clones_empty(
    gitreceive: GitReceive, tmp_path: Path
) -> None:
    controller(gitreceive, "POST", "/apps", {"name": "fresh"})
    status, headers, body = request(gitreceive, "/fresh.git/info/refs?service=git-receive-pack",
                                    gitreceive.key)  # fmt: skip
    assert status == 200
    assert headers["Content-Type"] == "application/x-git-receive-pack-advertisement"
    assert body.startswith(b"001f# service=git-receive-pack\n0000")
    out = git("clone", repo_url(gitreceive, "fresh"), "clone", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "empty repository" in out.stderr


def test_a_push_to_another_branch_is_refused_and_not_kept(
    gitreceive: GitReceive, tmp_path: Path
) -> None:
    app = controller(gitreceive, "POST", "/apps", {"name": "branchy"})
    work = new_work_tree(tmp_path)
    out = git("push", repo_url(gitreceive, "branchy"), "master:feature", cwd=work)
    assert out.returncode != 0
    assert "Only a push to master deploys: refs/heads/feature was refused." in out.stderr
    assert "git push flynn feature:master" in out.stderr
    assert "pre-receive hook declined" in out.stderr
    assert stored_repo(gitreceive, app["id"]) == 404


def test_a_push_that_cannot_build_is_rejected_and_leaves_nothing(
    gitreceive: GitReceive, tmp_path: Path
) -> None:
    app = controller(gitreceive, "POST", "/apps", {"name": "nohosts"})
    work = new_work_tree(tmp_path)
    out = git("push", repo_url(gitreceive, "nohosts"), "master", cwd=work)
    assert out.returncode != 0
    assert "-----> Building nohosts..." in out.stderr
    assert "Push rejected:" in out.stderr
    assert stored_repo(gitreceive, app["id"]) == 404
    assert controller(gitreceive, "GET", "/apps/nohosts/releases") == []
    # the same push without the key never reaches git
    out = git("push", repo_url(gitreceive, "nohosts", key="wrong"), "master", cwd=work)
    assert out.returncode != 0 and "Authentication failed" in out.stderr


def test_a_push_to_an_unknown_app_is_not_found(gitreceive: GitReceive, tmp_path: Path) -> None:
    work = new_work_tree(tmp_path)
    out = git("push", repo_url(gitreceive, "ghost"), "master", cwd=work)
    assert out.returncode != 0
    assert "not found" in out.stderr


def test_a_push_bigger_than_the_limit_is_refused_by_git(
    gitreceive: GitReceive, tmp_path: Path
) -> None:
    app = controller(gitreceive, "POST", "/apps", {"name": "bulky"})
    work = new_work_tree(tmp_path)
    (work / "blob.bin").write_bytes(os.urandom(2 * MAX_PUSH))
    assert git("add", ".", cwd=work).returncode == 0
    assert git("commit", "-qm", "big", cwd=work).returncode == 0
    out = git("push", repo_url(gitreceive, "bulky"), "master", cwd=work)
    assert out.returncode != 0
    assert "pack exceeds maximum allowed size" in out.stderr
    assert stored_repo(gitreceive, app["id"]) == 404
