"""The static buildpack (`buildpacks/static`) serves `examples/static` with the stack's nginx as
nobody on $PORT, follows a Staticfile (root, pushstate, directory listing), hides dotfiles and
its own files, logs requests on stdout, and says why when the Staticfile's root is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from stackbuild import App, Stacks, get

pytestmark = pytest.mark.needs("unshare", "setpriv")
PACK = "static"
PORT = 16040


def build(app: App) -> None:
    compiled = app.compile()
    assert compiled.returncode == 0, compiled.output
    print(f"static compile: {compiled.seconds:.1f}s")


def test_detect(stacks: Stacks, tmp_path: Path) -> None:
    for marker in ("index.html", "Staticfile"):
        app = App.from_files(stacks, PACK, {marker: ""}, tmp_path / marker)
        found = app.detect()
        assert (found.returncode, found.output.strip()) == (0, "Static HTML"), marker
    other = App.from_files(
        stacks, PACK, {"public/index.html": "", "package.json": "{}"}, tmp_path / "other"
    )
    refused = other.detect()
    assert (refused.returncode, refused.output) == (1, "")


def test_example_is_served_by_nginx_as_nobody(stacks: Stacks, tmp_path: Path) -> None:
    """(slugrunner's /runner/init runs the web process as nobody.)"""
    app = App.from_example(stacks, PACK, "static", tmp_path)
    (app.app / ".env").write_text("SECRET=1\n")
    build(app)
    command = app.web_command()
    assert command == "/app/.heroku/static/boot"
    with app.serving(PORT) as url:
        status, body = get(url)
        hidden = [get(url + path)[0] for path in (".env", ".heroku/static/nginx.conf")]
    assert status == 200 and "Static HTML" in body
    assert hidden == [404, 404]
    assert '"GET / HTTP/1.1" 200' in app.served_output


def test_staticfile_root_pushstate_and_directory_listing(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(
        stacks,
        PACK,
        {
            "Staticfile": "root: public\npushstate: enabled\ndirectory: visible\nssi: on\n",
            "public/index.html": "<p>Static HTML app</p>",
            "public/assets/app.css": "body {}",
            "notes.txt": "outside the root",
        },
        tmp_path,
    )
    compiled = app.compile()
    assert compiled.returncode == 0, compiled.output
    assert " !     Staticfile: ssi not supported by this buildpack; ignored." in compiled.output
    with app.serving(PORT + 1) as url:
        pages = {path: get(url + path) for path in ("", "some/route", "assets/", "notes.txt")}
        css = get(url + "assets/app.css")
    assert pages[""] == (200, "<p>Static HTML app</p>")
    assert pages["some/route"] == (200, "<p>Static HTML app</p>")
    assert pages["assets/"][0] == 200 and "app.css" in pages["assets/"][1]
    assert pages["notes.txt"] == (200, "<p>Static HTML app</p>")  # not served: pushstate
    assert css == (200, "body {}")


def test_staticfile_and_procfile_are_not_served(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(
        stacks, PACK, {"Staticfile": "", "index.html": "Static HTML", "Procfile": ""}, tmp_path
    )
    build(app)
    with app.serving(PORT + 2) as url:
        codes = [get(url + path)[0] for path in ("Staticfile", "Procfile", "missing.html")]
    assert codes == [404, 404, 404]


def test_missing_root_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(stacks, PACK, {"Staticfile": "root: dist\n"}, tmp_path)
    compiled = app.compile()
    assert compiled.returncode == 1
    assert " !     Staticfile says root: dist, but the app has no directory dist." in (
        compiled.output
    )
    assert "Create it (and put index.html in it), or fix root: in the Staticfile." in (
        compiled.output
    )
