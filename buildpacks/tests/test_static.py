"""The static buildpack (`buildpacks/static`) serves `examples/static` with the stack's nginx as
nobody on $PORT, follows a Staticfile (root, pushstate, directory listing), hides dotfiles and
its own files, logs requests on stdout, and says why when the Staticfile's root is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from stackbuild import App, get

from flynn_host.dev.stackroot import StackRoot

pytestmark = pytest.mark.needs("unshare", "setpriv")
PACK = "static"
PORT = 16040


@pytest.fixture(scope="module")
def root() -> Iterator[StackRoot]:
    with StackRoot() as stack:
        yield stack


def build(root: StackRoot, app: App) -> None:
    compiled = app.compile(root, PACK)
    assert compiled.returncode == 0, compiled.output
    print(f"static compile: {compiled.seconds:.1f}s")


def test_detect(root: StackRoot, tmp_path: Path) -> None:
    for marker in ("index.html", "Staticfile"):
        app = App.from_files({marker: ""}, tmp_path / marker)
        found = app.detect(root, PACK)
        assert (found.returncode, found.output.strip()) == (0, "Static HTML"), marker
    other = App.from_files({"public/index.html": "", "package.json": "{}"}, tmp_path / "other")
    refused = other.detect(root, PACK)
    assert (refused.returncode, refused.output) == (1, "")


def test_example_is_served_by_nginx_as_nobody(root: StackRoot, tmp_path: Path) -> None:
    """(StackRoot runs the web process as nobody, as slugrunner does.)"""
    app = App.from_example("static", tmp_path)
    (app.app / ".env").write_text("SECRET=1\n")
    build(root, app)
    command = app.web_command(root, PACK)
    assert command == "/app/.heroku/static/boot"
    with app.serving(root, command, PORT) as url:
        status, body = get(url)
        hidden = [get(url + path)[0] for path in (".env", ".heroku/static/nginx.conf")]
    assert status == 200 and "Static HTML" in body
    assert hidden == [404, 404]
    assert '"GET / HTTP/1.1" 200' in app.served_output


def test_staticfile_root_pushstate_and_directory_listing(root: StackRoot, tmp_path: Path) -> None:
    app = App.from_files(
        {
            "Staticfile": "root: public\npushstate: enabled\ndirectory: visible\nssi: on\n",
            "public/index.html": "<p>Static HTML app</p>",
            "public/assets/app.css": "body {}",
            "notes.txt": "outside the root",
        },
        tmp_path,
    )
    compiled = app.compile(root, PACK)
    assert compiled.returncode == 0, compiled.output
    assert " !     Staticfile: ssi not supported by this buildpack; ignored." in compiled.output
    with app.serving(root, app.web_command(root, PACK), PORT + 1) as url:
        pages = {path: get(url + path) for path in ("", "some/route", "assets/", "notes.txt")}
        css = get(url + "assets/app.css")
    assert pages[""] == (200, "<p>Static HTML app</p>")
    assert pages["some/route"] == (200, "<p>Static HTML app</p>")
    assert pages["assets/"][0] == 200 and "app.css" in pages["assets/"][1]
    assert pages["notes.txt"] == (200, "<p>Static HTML app</p>")  # not served: pushstate
    assert css == (200, "body {}")


def test_staticfile_and_procfile_are_not_served(root: StackRoot, tmp_path: Path) -> None:
    app = App.from_files({"Staticfile": "", "index.html": "Static HTML", "Procfile": ""}, tmp_path)
    build(root, app)
    with app.serving(root, app.web_command(root, PACK), PORT + 2) as url:
        codes = [get(url + path)[0] for path in ("Staticfile", "Procfile", "missing.html")]
    assert codes == [404, 404, 404]


def test_missing_root_fails_clearly(root: StackRoot, tmp_path: Path) -> None:
    app = App.from_files({"Staticfile": "root: dist\n"}, tmp_path)
    compiled = app.compile(root, PACK)
    assert compiled.returncode == 1
    assert " !     Staticfile says root: dist, but the app has no directory dist." in (
        compiled.output
    )
    assert "Create it (and put index.html in it), or fix root: in the Staticfile." in (
        compiled.output
    )
