"""The Go buildpack in the stack image: the example builds and serves, the build cache is reused,
vendored modules and Godeps workspaces build offline, and what cannot be built says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from slugbuild import EXAMPLES, BuiltApp, http_get

from flynn_host.dev.stackroot import StackRoot

pytestmark = pytest.mark.needs("unshare", "mount", "chroot", "setpriv")

PORTS = iter(range(16100, 16120))


@pytest.fixture(scope="module")
def root() -> Iterator[StackRoot]:
    with StackRoot() as stack:
        yield stack


def go_app(root: StackRoot, tmp_path: Path, files: dict[str, str]) -> BuiltApp:
    src = tmp_path / "src"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return BuiltApp.from_dir(root, "go", src, tmp_path)


HELLO = """package main

import (
\t"fmt"
\t"net/http"
\t"os"
)

func main() {
\thttp.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, %s) })
\thttp.ListenAndServe(":"+os.Getenv("PORT"), nil)
}
"""


def test_example_builds_serves_and_reuses_its_cache(root: StackRoot, tmp_path: Path) -> None:
    app = BuiltApp.from_example(root, "go", "go", tmp_path)
    assert app.detect().stdout.strip() == "Go"
    first, result = app.timed_compile()
    assert "-----> Building example.com/hello" in result.stdout
    assert "Using cached Go build cache" not in result.stdout
    assert (app.app / "bin" / "hello").exists()
    assert app.release() == {"web": "hello"}
    app.push(EXAMPLES / "go")
    second, result = app.timed_compile()
    assert "Using cached Go build cache" in result.stdout
    print(f"go example: first compile {first:.1f}s, cached {second:.1f}s")
    assert second < first
    with app.serving(next(PORTS)) as url:
        status, body = http_get(url)
    assert status == 200 and "Hello from Go" in body


def test_detect_refuses_an_app_without_go(root: StackRoot, tmp_path: Path) -> None:
    app = go_app(root, tmp_path, {"index.html": "hi", "lib/x.go": "package lib\n"})
    result = app.detect()
    assert result.returncode == 1 and result.stdout == ""


def test_vendored_module_builds_offline(root: StackRoot, tmp_path: Path) -> None:
    main = HELLO.replace('"os"\n', '"os"\n\n\t"example.com/greet"\n') % "greet.Hello()"
    app = go_app(
        root,
        tmp_path,
        {
            "go.mod": (
                "module example.com/vendored\n\ngo 1.19\n\nrequire example.com/greet v1.0.0\n"
            ),
            "main.go": main,
            "vendor/modules.txt": (
                "# example.com/greet v1.0.0\n## explicit; go 1.19\nexample.com/greet\n"
            ),
            "vendor/example.com/greet/greet.go": (
                'package greet\n\nfunc Hello() string { return "vendored Go greeting" }\n'
            ),
        },
    )
    result = app.compile(check=True)
    assert "Using vendor/" in result.stdout
    assert app.release() == {"web": "vendored"}
    with app.serving(next(PORTS)) as url:
        assert http_get(url) == (200, "vendored Go greeting")


def test_required_modules_without_vendor_fail_clearly(root: StackRoot, tmp_path: Path) -> None:
    app = go_app(
        root,
        tmp_path,
        {
            "go.mod": "module example.com/x\n\ngo 1.19\n\nrequire github.com/pkg/errors v0.9.1\n",
            "main.go": "package main\n\nfunc main() {}\n",
        },
    )
    result = app.compile()
    assert result.returncode != 0
    assert "github.com/pkg/errors" in result.stdout
    assert "proxy.golang.org" in result.stdout and "go mod vendor" in result.stdout


def test_newer_go_directive_warns_and_builds_with_1_19(root: StackRoot, tmp_path: Path) -> None:
    app = go_app(
        root,
        tmp_path,
        {
            "go.mod": "module example.com/newer\n\ngo 1.22.1\n\ntoolchain go1.22.3\n",
            "main.go": HELLO % '"built by go1.19"',
        },
    )
    result = app.compile(check=True)
    assert " !     go.mod asks for Go 1.22.1; the stack has Go 1.19" in result.stdout
    with app.serving(next(PORTS)) as url:
        assert http_get(url) == (200, "built by go1.19")


def test_code_newer_than_1_19_fails_clearly(root: StackRoot, tmp_path: Path) -> None:
    app = go_app(
        root,
        tmp_path,
        {
            "go.mod": "module example.com/newer\n\ngo 1.21\n",
            "main.go": "package main\n\nfunc main() { println(min(1, 2)) }\n",
        },
    )
    result = app.compile()
    assert result.returncode != 0
    assert "go.mod asks for Go 1.21, whose language or" in result.stdout
    assert "Make the code build with Go 1.19" in result.stdout


def test_godeps_app_builds_in_a_gopath(root: StackRoot, tmp_path: Path) -> None:
    main = HELLO.replace('"os"\n', '"os"\n\n\t"example.org/words"\n') % "words.Word"
    app = go_app(
        root,
        tmp_path,
        {
            "Godeps/Godeps.json": '{"ImportPath": "example.org/legacy", "GoVersion": "go1.6",'
            ' "Deps": [{"ImportPath": "example.org/words", "Rev": "abc"}]}',
            "Godeps/_workspace/src/example.org/words/words.go": (
                'package words\n\nconst Word = "Go from a Godeps workspace"\n'
            ),
            "main.go": main,
        },
    )
    assert app.detect().stdout.strip() == "Go"
    result = app.compile(check=True)
    assert "Godeps app: example.org/legacy" in result.stdout
    assert app.release() == {"web": "legacy"}
    with app.serving(next(PORTS)) as url:
        assert http_get(url) == (200, "Go from a Godeps workspace")


def test_go_files_without_an_import_path_fail_clearly(root: StackRoot, tmp_path: Path) -> None:
    app = go_app(root, tmp_path, {"main.go": "package main\n\nfunc main() {}\n"})
    assert app.detect().stdout.strip() == "Go"
    result = app.compile()
    assert result.returncode != 0 and "go mod init" in result.stdout
