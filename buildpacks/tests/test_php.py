"""The PHP buildpack in the slugbuilder and slugrunner images: the example is served by nginx and
php-fpm on $PORT with config vars in $_ENV and getenv(), a committed vendor/ and a document root
are used, the start script ends when nginx or php-fpm does, and what cannot be served says why."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from stackbuild import App, Stacks, get

pytestmark = pytest.mark.needs("unshare", "mount", "chroot", "setpriv")

PORTS = iter(range(16140, 16160))


def php_app(stacks: Stacks, tmp_path: Path) -> App:
    return App.from_example(stacks, "php", "php", tmp_path)


def composer(app: App, doc: dict[str, object]) -> None:
    app.write("composer.json", json.dumps(doc))


def test_example_serves_with_config_vars_in_env(stacks: Stacks, tmp_path: Path) -> None:
    app = php_app(stacks, tmp_path)
    assert app.detect().output.strip() == "PHP"
    app.write("env.php", "<?php echo $_ENV['GREETING'], ' ', getenv('GREETING');\n")
    app.set_env(GREETING="hej")
    result = app.compile(check=True)
    first = result.seconds
    print(f"php example: compile {first:.1f}s")
    assert "Document root: the app directory" in result.output
    assert app.release() == {"web": ".heroku/php/start-nginx"}
    port = next(PORTS)
    with app.serving(port) as url:
        status, body = get(url)
        assert status == 200 and "Hello from PHP 8.2" in body and f"port {port}" in body
        assert get(url + "env.php") == (200, "hej hej")
        assert get(url + ".heroku/php/document-root")[0] == 403
        assert get(url + "composer.json")[0] == 200
        assert get(url + "vendor/autoload.php")[0] == 403


def test_detect_refuses_an_app_without_php(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_example(stacks, "php", "go", tmp_path)
    result = app.detect()
    assert result.returncode == 1 and result.output == ""


def test_committed_vendor_and_document_root(stacks: Stacks, tmp_path: Path) -> None:
    app = php_app(stacks, tmp_path)
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
    assert "Using the committed vendor/ (1 packages)" in result.output
    assert "Document root: public" in result.output
    with app.serving(next(PORTS)) as url:
        assert get(url) == (200, "PHP vendored")
        assert get(url + "some/route?x=1") == (200, "PHP vendored")  # front controller
        assert get(url + "composer.json") == (200, "PHP vendored")  # not the file


def test_packages_without_vendor_fail_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = php_app(stacks, tmp_path)
    composer(app, {"require": {"php": "^8.1", "monolog/monolog": "^3.0"}})
    result = app.compile()
    assert result.returncode != 0
    assert "requires packages (monolog/monolog) but the app has no vendor/" in result.output
    assert "Packagist (repo.packagist.org)" in result.output
    assert "run `composer install` locally and commit vendor/" in result.output


def test_missing_extension_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = php_app(stacks, tmp_path)
    composer(app, {"require": {"ext-json": "*", "ext-imagick": "*"}})
    result = app.compile()
    assert result.returncode != 0
    assert "requires PHP extensions the stack's PHP lacks: imagick." in result.output


def test_other_php_version_warns(stacks: Stacks, tmp_path: Path) -> None:
    app = php_app(stacks, tmp_path)
    composer(app, {"require": {"php": "^7.4"}})
    result = app.compile(check=True)
    assert " !     composer.json requires PHP ^7.4; the stack has PHP 8.2" in result.output


def test_start_script_ends_when_nginx_cannot_start(stacks: Stacks, tmp_path: Path) -> None:
    app = php_app(stacks, tmp_path)
    app.compile(check=True)
    port = next(PORTS)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        proc = app.popen(
            ".heroku/php/start-nginx",
            env={"PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode != 0
    assert "Address already in use" in out.decode()
