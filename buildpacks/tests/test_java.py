"""The Java buildpack in the slugbuilder and slugrunner images: examples/java is detected, built
offline with Maven from Debian's Maven repository, released and served by embedded Jetty; a second
build uses the cached local repository; and each thing it cannot do stops the build with its
message."""

from __future__ import annotations

import importlib.util
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from stackbuild import BUILDPACKS, EXAMPLES, App, Stacks, get

PORT = 16200


def load_buildpack() -> ModuleType:
    """buildpacks/java/lib/java_buildpack.py, for its parsing functions."""
    path = BUILDPACKS / "java" / "lib" / "java_buildpack.py"
    spec = importlib.util.spec_from_file_location("java_buildpack", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def java_app(stacks: Stacks, tmp: Path, source: Path = EXAMPLES / "java") -> App:
    return App.from_dir(stacks, "java", source, tmp)


@pytest.fixture(scope="module")
def built(stacks: Stacks, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """examples/java compiled once with an empty cache."""
    app = java_app(stacks, tmp_path_factory.mktemp("java-example"))
    result = app.compile()
    print(f"cold compile of examples/java: {result.seconds:.1f} s")
    assert result.returncode == 0, result.output
    assert "No cached Maven repository" in result.output
    yield app


def test_detects_a_maven_project(stacks: Stacks, tmp_path: Path) -> None:
    app = java_app(stacks, tmp_path)
    result = app.detect()
    assert result.returncode == 0
    assert result.output.strip() == "Java"


def test_refuses_an_app_without_pom(stacks: Stacks, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.html").write_text("<p>hi</p>\n")
    app = java_app(stacks, tmp_path / "a", source)
    result = app.detect()
    assert result.returncode == 1
    assert result.output == ""


def test_example_is_built_released_and_served(built: App) -> None:
    assert (built.app / "target" / "dependency" / "jetty-server-9.4.57.v20241219.jar").exists()
    profile = (built.app / ".profile.d" / "java.sh").read_text()
    assert "JAVA_HOME=" in profile and "-Xmx300m" in profile
    assert built.web_command() == "java $JAVA_OPTS -jar target/hello-1.0.jar"
    with built.serving(PORT) as url:
        status, body = get(url)
    assert status == 200
    assert "Java" in body


def test_second_compile_uses_the_cache(built: App) -> None:
    jetty = "org/eclipse/jetty/jetty-server/9.4.57.v20241219/jetty-server-9.4.57.v20241219.jar"
    cached = built.cache / ".m2" / "repository" / jetty
    before = cached.stat().st_mtime_ns
    result = built.compile()
    print(f"cached compile of examples/java: {result.seconds:.1f} s")
    assert result.returncode == 0, result.output
    assert "Using cached Maven repository" in result.output
    # the local repository's copy was used, not fetched from Debian's repository again
    assert cached.stat().st_mtime_ns == before


def test_missing_dependencies_are_each_named(stacks: Stacks, tmp_path: Path) -> None:
    app = java_app(stacks, tmp_path)
    app.edit(
        "pom.xml",
        "<dependencies>",
        "<dependencies>"
        "<dependency><groupId>com.example.nowhere</groupId><artifactId>left-pad</artifactId>"
        "<version>1.0</version></dependency>"
        "<dependency><groupId>org.eclipse.jetty</groupId><artifactId>jetty-servlet</artifactId>"
        "<version>9.4.0.v20161208</version></dependency>",
    )
    result = app.compile()
    assert result.returncode != 0
    out = result.output
    assert " !       com.example.nowhere:left-pad:1.0  (not packaged in this stack)" in out
    assert "org.eclipse.jetty:jetty-servlet:9.4.0.v20161208  (this stack has 9.4.57" in out
    assert "Maven Central" in out and "unreachable" in out
    assert "file://${project.basedir}/repo" in out
    assert "find /usr/share/maven-repo -name '*.pom'" in out


def test_missing_plugin_is_named(stacks: Stacks, tmp_path: Path) -> None:
    app = java_app(stacks, tmp_path)
    app.edit(
        "pom.xml",
        "<plugins>",
        "<plugins><plugin><artifactId>maven-shade-plugin</artifactId><version>3.5.0</version>"
        "<executions><execution><phase>package</phase><goals><goal>shade</goal></goals>"
        "</execution></executions></plugin>",
    )
    result = app.compile()
    assert result.returncode != 0
    assert "org.apache.maven.plugins:maven-shade-plugin:3.5.0  (not packaged" in result.output
    assert "<pluginRepositories>" in result.output


def test_a_war_cannot_be_built(stacks: Stacks, tmp_path: Path) -> None:
    app = java_app(stacks, tmp_path)
    app.edit("pom.xml", "<packaging>jar</packaging>", "<packaging>war</packaging>")
    result = app.compile()
    assert result.returncode != 0
    assert "org.apache.maven.plugins:maven-war-plugin:2.2" in result.output
    assert "wars cannot be built here" in result.output


def test_a_jar_without_main_class_needs_a_procfile(stacks: Stacks, tmp_path: Path) -> None:
    app = java_app(stacks, tmp_path)
    app.edit("pom.xml", "<mainClass>com.example.Main</mainClass>", "")
    result = app.compile()
    assert result.returncode != 0
    assert "No runnable jar in target/" in result.output
    assert "<mainClass>" in result.output

    app.write(
        "Procfile",
        "web: java $JAVA_OPTS -cp 'target/hello-1.0.jar:target/dependency/*' com.example.Main\n",
    )
    result = app.compile()
    assert result.returncode == 0, result.output
    assert "the Procfile's web process starts the app" in result.output


def test_vendored_repository_other_java_and_config_vars(stacks: Stacks, tmp_path: Path) -> None:
    app = java_app(stacks, tmp_path)
    # a dependency Debian does not have, vendored into the app as a file:// repository
    vendored = app.app / "repo" / "com" / "example" / "greeting" / "1.0"
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
    (app.app / "system.properties").write_text("java.runtime.version=11\n")
    app.set_env(MAVEN_CUSTOM_GOALS="package", PATH="/nowhere")
    result = app.compile()
    assert result.returncode == 0, result.output
    out = result.output
    assert " !     system.properties asks for java.runtime.version=11" in out
    assert "config vars exported to the build: MAVEN_CUSTOM_GOALS\n" in out
    assert "-DskipTests package\n" in out  # the goals came from the config var
    assert (app.app / "target" / "dependency" / "greeting-1.0.jar").exists()
