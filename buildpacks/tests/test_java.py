"""The Java buildpack in the real `stack` image: examples/java is detected, built offline with
Maven from Debian's Maven repository, released and served by embedded Jetty; a second build uses
the cached local repository; and each thing it cannot do stops the build with its message."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from flynn_host.dev.host import require_programs
from flynn_host.dev.stackroot import NOBODY, StackRoot, writable_dir

REPO = Path(__file__).resolve().parents[2]
BUILDPACKS = REPO / "buildpacks"
EXAMPLE = REPO / "examples" / "java"
BUILDPACK = "/builder/buildpacks/java"
PORT = 16200


def load_buildpack() -> ModuleType:
    """buildpacks/java/lib/java_buildpack.py, for its parsing functions."""
    path = BUILDPACKS / "java" / "lib" / "java_buildpack.py"
    spec = importlib.util.spec_from_file_location("java_buildpack", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stack() -> Iterator[StackRoot]:
    if os.geteuid() != 0:
        pytest.skip("StackRoot mounts the stack image: root only")
    require_programs("unshare", "setpriv")
    with StackRoot() as root:
        yield root


# --- without the stack: Maven's messages and manifests -------------------------------------


def test_missing_artifacts_from_each_kind_of_maven_message() -> None:
    bp = load_buildpack()
    output = "\n".join(
        [
            "[WARNING] The POM for a.b:one:jar:1.0 is missing, no dependency information available",
            "[ERROR] Failed to execute goal on project x: Could not resolve dependencies for "
            "project g:x:jar:1: The following artifacts could not be resolved: a.b:one:jar:1.0, "
            "c.d:two:jar:tests:2.0: Could not find artifact a.b:one:jar:1.0 in debian (file:///x)",
            "[ERROR] Failure to find e:three:pom:3 in file:///usr/share/maven-repo was cached",
            "Non-resolvable parent POM for g:x:1: Could not find artifact "
            "org.springframework.boot:spring-boot-starter-parent:pom:3.1.0 in debian (file:///x)",
        ]
    )
    assert bp.missing_artifacts(output) == [
        ("a.b", "one", "1.0"),
        ("c.d", "two", "2.0"),
        ("e", "three", "3"),
        ("org.springframework.boot", "spring-boot-starter-parent", "3.1.0"),
    ]


def test_manifest_and_runnable_jar_choice(tmp_path: Path) -> None:
    bp = load_buildpack()
    target = tmp_path / "target"
    target.mkdir()
    long_path = "dependency/" + "x" * 80 + ".jar"
    main = "Manifest-Version: 1.0\r\nMain-Class: a.Main\r\n"
    for name, text in [
        ("app-1.jar", main + f"Class-Path: {long_path[:60]}\r\n {long_path[60:]}\r\n\r\n"),
        ("app-1-sources.jar", main),
        ("app-1-jar-with-dependencies.jar", main),
        ("lib.jar", "Manifest-Version: 1.0\n"),
    ]:
        with zipfile.ZipFile(target / name, "w") as jar:
            jar.writestr("META-INF/MANIFEST.MF", text)
    assert bp.manifest(target / "app-1.jar")["Class-Path"] == long_path
    assert bp.runnable_jar(tmp_path) == target / "app-1-jar-with-dependencies.jar"
    (target / "app-1-jar-with-dependencies.jar").unlink()
    assert bp.web_command(tmp_path) == "java $JAVA_OPTS -jar target/app-1.jar"


# --- in the stack ---------------------------------------------------------------------------


class App:
    """An app directory with its cache and env dirs, as slugbuilder lays them out."""

    def __init__(self, base: Path, source: Path = EXAMPLE) -> None:
        self.dir = base / "app"
        shutil.copytree(source, self.dir)
        self.cache = writable_dir(base, "cache")
        self.env = writable_dir(base, "env")

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.dir / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new))

    def set_env(self, name: str, value: str) -> None:
        (self.env / name).write_text(value)

    def run(self, stack: StackRoot, *argv: str) -> subprocess.CompletedProcess[str]:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(self.dir)], check=True)
        return stack.run(
            list(argv),
            binds={
                self.dir: "/app",
                self.cache: "/cache",
                self.env: "/env",
                BUILDPACKS: "/builder/buildpacks",
            },
            read_only=["/builder/buildpacks"],
            cwd="/app",
        )

    def compile(self, stack: StackRoot) -> subprocess.CompletedProcess[str]:
        return self.run(stack, f"{BUILDPACK}/bin/compile", "/app", "/cache", "/env")


def timed_compile(stack: StackRoot, app: App) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = app.compile(stack)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def built(stack: StackRoot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """examples/java compiled once with an empty cache."""
    app = App(tmp_path_factory.mktemp("java-example"))
    result, took = timed_compile(stack, app)
    print(f"cold compile of examples/java: {took:.1f} s")
    assert result.returncode == 0, result.stdout
    assert "No cached Maven repository" in result.stdout
    yield app


def web_command(stack: StackRoot, app: App) -> str:
    procfile = app.dir / "Procfile"
    if procfile.exists():
        for line in procfile.read_text().splitlines():
            if line.startswith("web:"):
                return line.removeprefix("web:").strip()
    release = app.run(stack, f"{BUILDPACK}/bin/release", "/app")
    assert release.returncode == 0, release.stdout
    for line in release.stdout.splitlines():
        if line.strip().startswith("web:"):
            return line.strip().removeprefix("web:").strip()
    raise AssertionError(f"no web process in release output:\n{release.stdout}")


def test_detects_a_maven_project(stack: StackRoot, tmp_path: Path) -> None:
    app = App(tmp_path)
    result = app.run(stack, f"{BUILDPACK}/bin/detect", "/app")
    assert result.returncode == 0
    assert result.stdout.strip() == "Java"


def test_refuses_an_app_without_pom(stack: StackRoot, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.html").write_text("<p>hi</p>\n")
    app = App(tmp_path / "a", source)
    result = app.run(stack, f"{BUILDPACK}/bin/detect", "/app")
    assert result.returncode == 1
    assert result.stdout == ""


def test_example_is_built_released_and_served(stack: StackRoot, built: App) -> None:
    assert (built.dir / "target" / "dependency" / "jetty-server-9.4.57.v20241219.jar").exists()
    profile = (built.dir / ".profile.d" / "java.sh").read_text()
    assert "JAVA_HOME=" in profile and "-Xmx300m" in profile
    command = web_command(stack, built)
    assert command == "java $JAVA_OPTS -jar target/hello-1.0.jar"
    script = f'for f in /app/.profile.d/*.sh; do [ -r "$f" ] && . "$f"; done; exec {command}'
    server = stack.popen(
        ["bash", "-c", script],
        binds={built.dir: "/app"},
        env={"PORT": str(PORT)},
        cwd="/app",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", timeout=2) as response:
                    status, body = response.status, response.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        assert status == 200
        assert "Java" in body
    finally:
        server.kill()
        server.wait()


def test_second_compile_uses_the_cache(stack: StackRoot, built: App) -> None:
    jetty = "org/eclipse/jetty/jetty-server/9.4.57.v20241219/jetty-server-9.4.57.v20241219.jar"
    cached = built.cache / ".m2" / "repository" / jetty
    before = cached.stat().st_mtime_ns
    result, took = timed_compile(stack, built)
    print(f"cached compile of examples/java: {took:.1f} s")
    assert result.returncode == 0, result.stdout
    assert "Using cached Maven repository" in result.stdout
    # the local repository's copy was used, not fetched from Debian's repository again
    assert cached.stat().st_mtime_ns == before


def test_missing_dependencies_are_each_named(stack: StackRoot, tmp_path: Path) -> None:
    app = App(tmp_path)
    app.edit(
        "pom.xml",
        "<dependencies>",
        "<dependencies>"
        "<dependency><groupId>com.example.nowhere</groupId><artifactId>left-pad</artifactId>"
        "<version>1.0</version></dependency>"
        "<dependency><groupId>org.eclipse.jetty</groupId><artifactId>jetty-servlet</artifactId>"
        "<version>9.4.0.v20161208</version></dependency>",
    )
    result = app.compile(stack)
    assert result.returncode != 0
    out = result.stdout
    assert " !       com.example.nowhere:left-pad:1.0  (not packaged in this stack)" in out
    assert "org.eclipse.jetty:jetty-servlet:9.4.0.v20161208  (this stack has 9.4.57" in out
    assert "Maven Central" in out and "unreachable" in out
    assert "file://${project.basedir}/repo" in out
    assert "find /usr/share/maven-repo -name '*.pom'" in out


def test_missing_plugin_is_named(stack: StackRoot, tmp_path: Path) -> None:
    app = App(tmp_path)
    app.edit(
        "pom.xml",
        "<plugins>",
        "<plugins><plugin><artifactId>maven-shade-plugin</artifactId><version>3.5.0</version>"
        "<executions><execution><phase>package</phase><goals><goal>shade</goal></goals>"
        "</execution></executions></plugin>",
    )
    result = app.compile(stack)
    assert result.returncode != 0
    assert "org.apache.maven.plugins:maven-shade-plugin:3.5.0  (not packaged" in result.stdout
    assert "<pluginRepositories>" in result.stdout


def test_a_war_cannot_be_built(stack: StackRoot, tmp_path: Path) -> None:
    app = App(tmp_path)
    app.edit("pom.xml", "<packaging>jar</packaging>", "<packaging>war</packaging>")
    result = app.compile(stack)
    assert result.returncode != 0
    assert "org.apache.maven.plugins:maven-war-plugin:2.2" in result.stdout
    assert "wars cannot be built here" in result.stdout


def test_a_jar_without_main_class_needs_a_procfile(stack: StackRoot, tmp_path: Path) -> None:
    app = App(tmp_path)
    app.edit("pom.xml", "<mainClass>com.example.Main</mainClass>", "")
    result = app.compile(stack)
    assert result.returncode != 0
    assert "No runnable jar in target/" in result.stdout
    assert "<mainClass>" in result.stdout

    (app.dir / "Procfile").write_text(
        "web: java $JAVA_OPTS -cp 'target/hello-1.0.jar:target/dependency/*' com.example.Main\n"
    )
    result = app.compile(stack)
    assert result.returncode == 0, result.stdout
    assert "the Procfile's web process starts the app" in result.stdout


def test_vendored_repository_other_java_and_config_vars(stack: StackRoot, tmp_path: Path) -> None:
    app = App(tmp_path)
    # a dependency Debian does not have, vendored into the app as a file:// repository
    vendored = app.dir / "repo" / "com" / "example" / "greeting" / "1.0"
    vendored.mkdir(parents=True)
    with zipfile.ZipFile(vendored / "greeting-1.0.jar", "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        jar.writestr("greeting.txt", "hello\n")
    (vendored / "greeting-1.0.pom").write_text(
        "<project><modelVersion>4.0.0</modelVersion><groupId>com.example</groupId>"
        "<artifactId>greeting</artifactId><version>1.0</version></project>\n"
    )
    app.edit(
        "pom.xml",
        "<dependencies>",
        "<repositories><repository><id>vendored</id><url>file://${project.basedir}/repo</url>"
        "</repository></repositories><dependencies><dependency><groupId>com.example</groupId>"
        "<artifactId>greeting</artifactId><version>1.0</version></dependency>",
    )
    (app.dir / "system.properties").write_text("java.runtime.version=11\n")
    app.set_env("MAVEN_CUSTOM_GOALS", "package")
    app.set_env("PATH", "/nowhere")
    result = app.compile(stack)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert " !     system.properties asks for java.runtime.version=11" in out
    assert "config vars exported to the build: MAVEN_CUSTOM_GOALS\n" in out
    assert "-DskipTests package\n" in out  # the goals came from the config var
    assert (app.dir / "target" / "dependency" / "greeting-1.0.jar").exists()
