"""The Python buildpack (`buildpacks/python`) builds and serves `examples/python-flask` (Flask and
gunicorn from PyPI) in the slugbuilder and slugrunner images, installs from its cached wheels
without the network on the next build, builds a pyproject.toml project, warns about a Python the
stack does not have, gives a Django project a default web process, and says why when it cannot
build."""

from __future__ import annotations

from pathlib import Path

import pytest
from stackbuild import App, Stacks, get

pytestmark = pytest.mark.needs("unshare", "setpriv")
PACK = "python"
PORT = 16020


@pytest.fixture(scope="module")
def example(stacks: Stacks, tmp_path_factory: pytest.TempPathFactory) -> tuple[App, float]:
    """examples/python-flask built once (its first build's time alongside)."""
    app = App.from_example(stacks, PACK, "python-flask", tmp_path_factory.mktemp("example"))
    build = app.compile()
    assert build.returncode == 0, build.output
    return app, build.seconds


def test_detect(stacks: Stacks, tmp_path: Path) -> None:
    for marker in ("requirements.txt", "pyproject.toml", "setup.py"):
        app = App.from_files(stacks, PACK, {marker: ""}, tmp_path / marker)
        found = app.detect()
        assert (found.returncode, found.output.strip()) == (0, "Python"), marker
    other = App.from_files(stacks, PACK, {"package.json": "{}", "app.py": ""}, tmp_path / "other")
    refused = other.detect()
    assert (refused.returncode, refused.output) == (1, "")


def test_example_builds_and_serves(example: tuple[App, float]) -> None:
    app, seconds = example
    assert (app.app / ".heroku/python/bin/gunicorn").exists()
    assert app.release() == {}
    with app.serving(PORT) as url:
        status, body = get(url)
    assert status == 200 and "Python 3.11." in body
    print(f"examples/python-flask first compile: {seconds:.1f}s")


def test_second_build_installs_from_cached_wheels(example: tuple[App, float]) -> None:
    app, _ = example
    # an index nobody answers: anything not taken from the cache would fail the build
    app.set_env(PIP_INDEX_URL="http://127.0.0.1:9/simple")
    try:
        build = app.compile()
    finally:
        app.clear_env()
    assert build.returncode == 0, build.output
    assert "Using cached wheels (8 in the cache)" in build.output
    assert "Installed from cached wheels, without downloading" in build.output
    print(f"examples/python-flask cached compile: {build.seconds:.1f}s")


def test_profile_puts_the_virtualenv_first(example: tuple[App, float]) -> None:
    app, _ = example
    shown = app.run("bash", "-c", "command -v python; echo $WEB_CONCURRENCY")
    assert shown.stdout.split() == ["/app/.heroku/python/bin/python", "1"]


def test_pyproject_project_is_installed(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(
        stacks,
        PACK,
        {
            "pyproject.toml": '[project]\nname = "hello"\nversion = "1.0"\n'
            'dependencies = ["six"]\n[build-system]\nrequires = ["setuptools"]\n'
            'build-backend = "setuptools.build_meta"\n',
            "hello.py": "import six\n",
        },
        tmp_path,
    )
    build = app.compile()
    assert build.returncode == 0, build.output
    assert "-----> Installing the app (pyproject.toml) with pip" in build.output
    imported = app.run("bash", "-c", "cd / && python -c 'import hello, six'")
    assert imported.returncode == 0, imported.stdout


def test_django_project_gets_a_gunicorn_web_process(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(
        stacks,
        PACK,
        {"requirements.txt": "gunicorn\n", "manage.py": "", "mysite/wsgi.py": ""},
        tmp_path,
    )
    assert app.compile().returncode == 0
    assert app.release() == {"web": "gunicorn mysite.wsgi"}


@pytest.mark.parametrize(
    ("file", "version", "warned"),
    [("runtime.txt", "python-3.12.1", True), (".python-version", "3.11", False)],
)
def test_other_python_versions_warn_and_build_with_the_stack(
    stacks: Stacks, tmp_path: Path, file: str, version: str, warned: bool
) -> None:
    app = App.from_files(stacks, PACK, {"requirements.txt": "", file: version + "\n"}, tmp_path)
    build = app.compile()
    assert build.returncode == 0, build.output
    warning = f" !     {file} asks for {version}, but the stack has Python 3.11."
    assert (warning in build.output) is warned
    assert "-----> Using Python 3.11." in build.output


def test_requirement_outside_pypi_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    requirements = "flask\ngit+https://github.com/pallets/click.git#egg=click\n"
    app = App.from_files(stacks, PACK, {"requirements.txt": requirements}, tmp_path)
    build = app.compile()
    assert build.returncode == 1
    assert " !     These requirements come from outside PyPI" in build.output
    assert "requirements.txt: git+https://github.com/pallets/click.git#egg=click" in build.output
    assert "require it by path (./vendor/<name>)" in build.output


def test_requirement_pip_cannot_find_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(
        stacks, PACK, {"requirements.txt": "flynn-no-such-package-xyz==1.0\n"}, tmp_path
    )
    build = app.compile()
    assert build.returncode == 1
    assert " !     pip could not install requirements.txt (see above)" in build.output
