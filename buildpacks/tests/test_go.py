"""The Go buildpack in the slugbuilder and slugrunner images: the example builds and serves, the
build cache is reused, vendored modules and Godeps workspaces build offline, and what cannot be
built says why."""

from __future__ import annotations

from pathlib import Path

import pytest
from stackbuild import EXAMPLES, App, Stacks, get

pytestmark = pytest.mark.needs("unshare", "mount", "chroot", "setpriv")

PORTS = iter(range(16100, 16120))


def go_app(stacks: Stacks, tmp_path: Path, files: dict[str, str]) -> App:
    return App.from_files(stacks, "go", files, tmp_path)


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


def test_example_builds_serves_and_reuses_its_cache(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_example(stacks, "go", "go", tmp_path)
    assert app.detect().output.strip() == "Go"
    result = app.compile(check=True)
    first = result.seconds
    assert "-----> Building example.com/hello" in result.output
    assert "Using cached Go build cache" not in result.output
    assert (app.app / "bin" / "hello").exists()
    assert app.release() == {"web": "hello"}
    app.push(EXAMPLES / "go")
    result = app.compile(check=True)
    second = result.seconds
    assert "Using cached Go build cache" in result.output
    print(f"go example: first compile {first:.1f}s, cached {second:.1f}s")
    assert second < first
    with app.serving(next(PORTS)) as url:
        status, body = get(url)
    assert status == 200 and "Hello from Go" in body


def test_detect_refuses_an_app_without_go(stacks: Stacks, tmp_path: Path) -> None:
    app = go_app(stacks, tmp_path, {"index.html": "hi", "lib/x.go": "package lib\n"})
    result = app.detect()
    assert result.returncode == 1 and result.output == ""


def test_vendored_module_builds_offline(stacks: Stacks, tmp_path: Path) -> None:
    main = HELLO.replace('"os"\n', '"os"\n\n\t"example.com/greet"\n') % "greet.Hello()"
    app = go_app(
        stacks,
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
    assert "Using vendor/" in result.output
    assert app.release() == {"web": "vendored"}
    with app.serving(next(PORTS)) as url:
        assert get(url) == (200, "vendored Go greeting")


def test_required_modules_without_vendor_fail_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = go_app(
        stacks,
        tmp_path,
        {
            "go.mod": "module example.com/x\n\ngo 1.19\n\nrequire github.com/pkg/errors v0.9.1\n",
            "main.go": "package main\n\nfunc main() {}\n",
        },
    )
    result = app.compile()
    assert result.returncode != 0
    assert "github.com/pkg/errors" in result.output
    assert "proxy.golang.org" in result.output and "go mod vendor" in result.output


def test_newer_go_directive_warns_and_builds_with_1_19(stacks: Stacks, tmp_path: Path) -> None:
    app = go_app(
        stacks,
        tmp_path,
        {
            "go.mod": "module example.com/newer\n\ngo 1.22.1\n\ntoolchain go1.22.3\n",
            "main.go": HELLO % '"built by go1.19"',
        },
    )
    result = app.compile(check=True)
    assert " !     go.mod asks for Go 1.22.1; the stack has Go 1.19" in result.output
    with app.serving(next(PORTS)) as url:
        assert get(url) == (200, "built by go1.19")


def test_code_newer_than_1_19_fails_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = go_app(
        stacks,
        tmp_path,
        {
            "go.mod": "module example.com/newer\n\ngo 1.21\n",
            "main.go": "package main\n\nfunc main() { println(min(1, 2)) }\n",
        },
    )
    result = app.compile()
    assert result.returncode != 0
    assert "go.mod asks for Go 1.21, whose language or" in result.output
    assert "Make the code build with Go 1.19" in result.output


def test_godeps_app_builds_in_a_gopath(stacks: Stacks, tmp_path: Path) -> None:
    main = HELLO.replace('"os"\n', '"os"\n\n\t"example.org/words"\n') % "words.Word"
    app = go_app(
        stacks,
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
    assert app.detect().output.strip() == "Go"
    result = app.compile(check=True)
    assert "Godeps app: example.org/legacy" in result.output
    assert app.release() == {"web": "legacy"}
    with app.serving(next(PORTS)) as url:
        assert get(url) == (200, "Go from a Godeps workspace")


def test_go_files_without_an_import_path_fail_clearly(stacks: Stacks, tmp_path: Path) -> None:
    app = go_app(stacks, tmp_path, {"main.go": "package main\n\nfunc main() {}\n"})
    assert app.detect().output.strip() == "Go"
    result = app.compile()
    assert result.returncode != 0 and "go mod init" in result.output
