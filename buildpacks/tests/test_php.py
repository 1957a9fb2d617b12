"""The PHP buildpack in the stack image: the example is served by nginx and php-fpm on $PORT
with config vars in $_ENV and getenv(), a committed vendor/ and a document root are used, the
start script ends when nginx or php-fpm does, and what cannot be served says why."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from slugbuild import BuiltApp, http_get

from flynn_host.dev.stackroot import StackRoot

pytestmark = pytest.mark.needs("unshare", "mount", "chroot", "setpriv")

PORTS = iter(range(16140, 16160))


@pytest.fixture(scope="module")
def root() -> Iterator[StackRoot]:
    with StackRoot() as stack:
        yield stack


def php_app(root: StackRoot, tmp_path: Path) -> BuiltApp:
    return BuiltApp.from_example(root, "php", "php", tmp_path)


def composer(app: BuiltApp, doc: dict[str, object]) -> None:
    app.write("composer.json", json.dumps(doc))


def test_example_serves_with_config_vars_in_env(root: StackRoot, tmp_path: Path) -> None:
    app = php_app(root, tmp_path)
    assert app.detect().stdout.strip() == "PHP"
    app.write("env.php", "<?php echo $_ENV['GREETING'], ' ', getenv('GREETING');\n")
    app.set_env("GREETING", "hej")
    first, result = app.timed_compile()
    print(f"php example: compile {first:.1f}s")
    assert "Document root: the app directory" in result.stdout
    assert app.release() == {"web": ".heroku/php/start-nginx"}
    port = next(PORTS)
    with app.serving(port) as url:
        status, body = http_get(url)
        assert status == 200 and "Hello from PHP 8.2" in body and f"port {port}" in body
        assert http_get(url + "env.php") == (200, "hej hej")
        assert http_get(url + ".heroku/php/document-root")[0] == 403
        assert http_get(url + "composer.json")[0] == 200
        assert http_get(url + "vendor/autoload.php")[0] == 403


def test_detect_refuses_an_app_without_php(root: StackRoot, tmp_path: Path) -> None:
    app = BuiltApp.from_example(root, "php", "go", tmp_path)
    result = app.detect()
    assert result.returncode == 1 and result.stdout == ""


def test_committed_vendor_and_document_root(root: StackRoot, tmp_path: Path) -> None:
    app = php_app(root, tmp_path)
    composer(
        app,
        {
            "require": {"php": "^8.0", "ext-json": "*", "acme/greeter": "^1.0"},
            "extra": {"heroku": {"document-root": "public"}},
        },
    )
    app.write(
        "vendor/autoload.php",
        "<?php spl_autoload_register(function ($c) {"
        " require __DIR__ . '/acme/greeter/' . basename(str_replace('\\\\', '/', $c)) . '.php';"
        " });\n",
    )
    app.write(
        "vendor/acme/greeter/Greeter.php",
        "<?php namespace Acme; class Greeter { static function hi() { return 'PHP vendored'; } }\n",
    )
    app.write(
        "public/index.php",
        "<?php require __DIR__ . '/../vendor/autoload.php'; echo \\Acme\\Greeter::hi();\n",
    )
    result = app.compile(check=True)
    assert "Using the committed vendor/ (1 packages)" in result.stdout
    assert "Document root: public" in result.stdout
    with app.serving(next(PORTS)) as url:
        assert http_get(url) == (200, "PHP vendored")
        assert http_get(url + "some/route?x=1") == (200, "PHP vendored")  # front controller
        assert http_get(url + "composer.json") == (200, "PHP vendored")  # not the file


def test_packages_without_vendor_fail_clearly(root: StackRoot, tmp_path: Path) -> None:
    app = php_app(root, tmp_path)
    composer(app, {"require": {"php": "^8.1", "monolog/monolog": "^3.0"}})
    result = app.compile()
    assert result.returncode != 0
    assert "requires packages (monolog/monolog) but the app has no vendor/" in result.stdout
    assert "Packagist (repo.packagist.org)" in result.stdout
    assert "run `composer install` locally and commit vendor/" in result.stdout


def test_missing_extension_fails_clearly(root: StackRoot, tmp_path: Path) -> None:
    app = php_app(root, tmp_path)
    composer(app, {"require": {"ext-json": "*", "ext-imagick": "*"}})
    result = app.compile()
    assert result.returncode != 0
    assert "requires PHP extensions the stack's PHP lacks: imagick." in result.stdout


def test_other_php_version_warns(root: StackRoot, tmp_path: Path) -> None:
    app = php_app(root, tmp_path)
    composer(app, {"require": {"php": "^7.4"}})
    result = app.compile(check=True)
    assert " !     composer.json requires PHP ^7.4; the stack has PHP 8.2" in result.stdout


def test_start_script_ends_when_nginx_cannot_start(root: StackRoot, tmp_path: Path) -> None:
    app = php_app(root, tmp_path)
    app.compile(check=True)
    port = next(PORTS)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        proc = root.popen(
            ["bash", "-c", "exec .heroku/php/start-nginx"],
            binds={app.app: "/app"},
            env={"PORT": str(port)},
            cwd="/app",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode != 0
    assert "Address already in use" in out.decode()
