"""The Java buildpack's compile and release steps, run with the stack's python3.

A cluster cannot reach Maven Central, so the app is built with the stack's Maven in offline
mode against Debian's Maven repository (`/usr/share/maven-repo`, filled by the stack's
`lib*-java` packages): a settings.xml in the cache mirrors every remote repository to it
(`external:*`, so a `file://` repository inside the app still works) and keeps the local
repository in the cache between builds. Debian has no assembly, shade, dependency or war
plugin, so a runnable jar lists its dependencies in its manifest's Class-Path (maven-jar-plugin's
`addClasspath`) and this buildpack copies them there from the local repository.

    java_buildpack.py compile BUILD_DIR CACHE_DIR ENV_DIR
    java_buildpack.py release BUILD_DIR
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import NoReturn

DEBIAN_REPO = Path("/usr/share/maven-repo")
# versions Maven itself asks for that Debian lacks, and the compatible ones it has: Maven adds
# plexus-utils 1.1 straight into the resolved graph of every plugin that does not depend on
# plexus-utils (Debian's maven-clean-plugin, for one), so 1.1 needs a jar, not just a relocation
STAND_INS = {("org.codehaus.plexus", "plexus-utils", "1.1"): "3.4.2"}
STAND_IN_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- written by Flynn's Java buildpack: Debian has {version} -->
<project>
  <modelVersion>4.0.0</modelVersion>
  <groupId>{group}</groupId>
  <artifactId>{artifact}</artifactId>
  <version>{wanted}</version>
  <distributionManagement>
    <relocation><version>{version}</version></relocation>
  </distributionManagement>
</project>
"""
JAVA_VERSION = "17"
DEFAULT_JAVA_OPTS = "-Xmx300m -Xss512k -XX:CICompilerCount=2 -Dfile.encoding=UTF-8"
DEFAULT_MAVEN_OPTS = "-Xmx512m -XX:+TieredCompilation -XX:TieredStopAtLevel=1"
DEFAULT_GOALS = "clean package"
DEFAULT_MAVEN_FLAGS = "-DskipTests"
# config vars that would break the build's tools if exported (Heroku's Java buildpack list,
# plus the ones this buildpack sets itself)
UNEXPORTED_ENV = frozenset(
    {"PATH", "GIT_DIR", "CPATH", "CPPATH", "LD_PRELOAD", "LIBRARY_PATH"}
    | {"JAVA_OPTS", "JAVA_TOOL_OPTIONS", "JAVA_HOME", "HOME"}
)
# jars that are never the app itself
NOT_RUNNABLE = ("-sources.jar", "-javadoc.jar", "-tests.jar", "-test-sources.jar")
FAT_JAR_SUFFIXES = ("-jar-with-dependencies.jar", "-shaded.jar", "-all.jar")

NO_RUNNABLE_JAR_FIX = """\
Fix: set the main class and the dependencies' Class-Path in pom.xml:
  <artifactId>maven-jar-plugin</artifactId><version>3.3.0</version>
  <configuration><archive><manifest><mainClass>com.example.Main</mainClass>
    <addClasspath>true</addClasspath><classpathPrefix>dependency/</classpathPrefix>
  </manifest></archive></configuration>
(Debian has no assembly or shade plugin for a jar-with-dependencies), or add a Procfile:
  web: java $JAVA_OPTS -cp 'target/*:target/dependency/*' com.example.Main"""

SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<!-- written by Flynn's Java buildpack: Maven Central is unreachable, Debian's repository
     stands in for every remote repository; file:// repositories of the app are kept -->
<settings>
  <localRepository>{local_repo}</localRepository>
  <offline>true</offline>
  <mirrors>
    <mirror>
      <id>debian</id>
      <name>Debian's Maven repository (the stack's lib*-java packages)</name>
      <mirrorOf>external:*</mirrorOf>
      <url>file://{debian_repo}</url>
    </mirror>
  </mirrors>
  <profiles>
    <profile>
      <!-- Debian's repository has no checksum files; the stand-ins' repository holds
           what Maven asks for and Debian lacks -->
      <id>flynn-debian</id>
      <repositories>
        <repository>
          <id>flynn-stand-ins</id>
          <url>file://{stand_ins}</url>
          <releases><checksumPolicy>ignore</checksumPolicy></releases>
          <snapshots><enabled>false</enabled></snapshots>
        </repository>
        <repository>
          <id>central</id>
          <url>https://repo.maven.apache.org/maven2</url>
          <releases><checksumPolicy>ignore</checksumPolicy></releases>
          <snapshots><enabled>false</enabled></snapshots>
        </repository>
      </repositories>
      <pluginRepositories>
        <pluginRepository>
          <id>flynn-stand-ins</id>
          <url>file://{stand_ins}</url>
          <releases><checksumPolicy>ignore</checksumPolicy></releases>
          <snapshots><enabled>false</enabled></snapshots>
        </pluginRepository>
        <pluginRepository>
          <id>central</id>
          <url>https://repo.maven.apache.org/maven2</url>
          <releases><checksumPolicy>ignore</checksumPolicy></releases>
          <snapshots><enabled>false</enabled></snapshots>
        </pluginRepository>
      </pluginRepositories>
    </profile>
  </profiles>
  <activeProfiles>
    <activeProfile>flynn-debian</activeProfile>
  </activeProfiles>
</settings>
"""

# Maven's ways of saying an artifact is not in any repository it may use
_COORDS = r"([\w.\-]+:[\w.\-]+(?::[\w.\-]+){1,3})"
_MISSING = [
    re.compile(r"Could not find artifact " + _COORDS),
    re.compile(r"Failure to find " + _COORDS),
    re.compile(r"The POM for " + _COORDS + r" is missing"),
]
# Maven's console library resets colours even in batch mode
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UNRESOLVED_LIST = re.compile(r"The following artifacts could not be resolved: (.+?): ")


def step(text: str) -> None:
    print(f"-----> {text}", flush=True)


def info(text: str) -> None:
    print(f"       {text}", flush=True)


def warn(text: str) -> None:
    for line in text.splitlines() or [""]:
        print(f" !     {line}".rstrip(), flush=True)


def fail(text: str) -> NoReturn:
    warn(text)
    sys.exit(1)


# --- the JDK -------------------------------------------------------------------------------


def java_home() -> Path:
    javac = shutil.which("javac")
    if javac is None:
        fail("The stack has no javac: its openjdk-17-jdk-headless package is missing.")
    return Path(javac).resolve().parent.parent


def requested_java(build_dir: Path) -> str | None:
    """`java.runtime.version` from system.properties, as Heroku's buildpack reads it."""
    path = build_dir / "system.properties"
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "java.runtime.version":
            return value.strip()
    return None


def check_java_version(build_dir: Path) -> None:
    wanted = requested_java(build_dir)
    if wanted is None:
        return
    if wanted.removeprefix("1.").split(".")[0] == JAVA_VERSION:
        info(f"system.properties asks for Java {wanted}: OK")
        return
    warn(
        f"system.properties asks for java.runtime.version={wanted}, but this stack has only\n"
        f"OpenJDK {JAVA_VERSION} (Debian's openjdk-17-jdk-headless) and no other JDK can be\n"
        f"downloaded from this cluster: building and running with Java {JAVA_VERSION}.\n"
        f"Set java.runtime.version={JAVA_VERSION} to silence this warning."
    )


# --- Maven ---------------------------------------------------------------------------------


def export_env_dir(env_dir: Path) -> list[str]:
    """Export the app's config vars to the build (all but UNEXPORTED_ENV)."""
    exported: list[str] = []
    if not env_dir.is_dir():
        return exported
    for path in sorted(env_dir.iterdir()):
        name = path.name
        if not path.is_file() or name in UNEXPORTED_ENV or not name.isidentifier():
            continue
        os.environ[name] = path.read_text(errors="replace")
        exported.append(name)
    return exported


def write_stand_ins(repo: Path) -> None:
    """A file:// repository of STAND_INS: a relocating POM and a link to Debian's jar each."""
    shutil.rmtree(repo, ignore_errors=True)
    for (group, artifact, wanted), version in STAND_INS.items():
        debian = DEBIAN_REPO.joinpath(*group.split("."), artifact, version)
        directory = repo.joinpath(*group.split("."), artifact, wanted)
        directory.mkdir(parents=True)
        pom = STAND_IN_POM.format(group=group, artifact=artifact, wanted=wanted, version=version)
        (directory / f"{artifact}-{wanted}.pom").write_text(pom)
        (directory / f"{artifact}-{wanted}.jar").symlink_to(debian / f"{artifact}-{version}.jar")


def write_settings(cache_dir: Path) -> tuple[Path, Path]:
    """settings.xml and the stand-ins' repository, rewritten each build, and the local
    repository, kept."""
    m2 = cache_dir / ".m2"
    local_repo = m2 / "repository"
    local_repo.mkdir(parents=True, exist_ok=True)
    stand_ins = m2 / "stand-ins"
    write_stand_ins(stand_ins)
    settings = m2 / "settings.xml"
    text = SETTINGS.format(local_repo=local_repo, debian_repo=DEBIAN_REPO, stand_ins=stand_ins)
    settings.write_text(text)
    return settings, local_repo


def count_cached(local_repo: Path) -> int:
    return sum(1 for _ in local_repo.rglob("*.pom"))


def run_maven(build_dir: Path, settings: Path) -> tuple[int, str]:
    """Run Maven, its output indented as it comes; returns its exit code and output."""
    goals = os.environ.get("MAVEN_CUSTOM_GOALS", DEFAULT_GOALS)
    flags = os.environ.get("MAVEN_CUSTOM_OPTS", DEFAULT_MAVEN_FLAGS)
    # offline, yet file:// repositories (Debian's, the app's own) are allowed; -U retries
    # artifacts an earlier build found missing (the stack may have gained them since)
    argv = ["mvn", "-B", "-ntp", "-U", "-o", "-Daether.offline.protocols=file"]
    argv += ["-Dstyle.color=never", "-s", str(settings), "-f", str(build_dir / "pom.xml")]
    argv += shlex.split(flags) + shlex.split(goals)
    env = dict(os.environ)
    env.setdefault("MAVEN_OPTS", DEFAULT_MAVEN_OPTS)
    env["JAVA_HOME"] = str(java_home())
    info("$ " + shlex.join(argv))
    proc = subprocess.Popen(
        argv,
        cwd=build_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        line = _ANSI.sub("", line)
        lines.append(line)
        if line.strip():
            print(f"       {line.rstrip()}", flush=True)
    return proc.wait(), "".join(lines)


def missing_artifacts(output: str) -> list[tuple[str, str, str]]:
    """(groupId, artifactId, version) of each artifact Maven could not find, in order."""
    found: list[tuple[str, str, str]] = []

    def add(coords: str) -> None:
        parts = coords.split(":")
        gav = (parts[0], parts[1], parts[-1])
        if len(parts) >= 3 and gav not in found:
            found.append(gav)

    for line in output.splitlines():
        for pattern in _MISSING:
            for match in pattern.finditer(line):
                add(match.group(1))
        for match in _UNRESOLVED_LIST.finditer(line):
            for coords in match.group(1).split(", "):
                add(coords.strip())
    return found


def debian_versions(group: str, artifact: str) -> list[str]:
    directory = DEBIAN_REPO.joinpath(*group.split("."), artifact)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


def explain_missing(missing: list[tuple[str, str, str]]) -> str:
    lines = ["Maven could not resolve these artifacts:"]
    for group, artifact, version in missing:
        have = debian_versions(group, artifact)
        where = f"this stack has {', '.join(have)}" if have else "not packaged in this stack"
        lines.append(f"  {group}:{artifact}:{version}  ({where})")
    lines += [
        "",
        "Maven Central (and every other remote Maven repository) is unreachable from this",
        f"cluster: builds use Debian's Maven repository {DEBIAN_REPO} (the stack's",
        "lib*-java packages) and file:// repositories inside the app. To fix:",
        "  - ask for a version the stack has (listed above; all of them:",
        f"    `find {DEBIAN_REPO} -name '*.pom'` in the stack image, or the bookworm",
        "    lib*-java packages' /usr/share/maven-repo files on packages.debian.org), or",
        "  - vendor the artifacts into the app: a Maven-layout `repo/` directory (e.g.",
        "    `mvn install:install-file -Dfile=x.jar -DgroupId=G -DartifactId=A -Dversion=V",
        "    -Dpackaging=jar -DlocalRepositoryPath=repo`, or copy them from your",
        "    ~/.m2/repository), committed and declared in pom.xml:",
        "      <repositories><repository><id>vendored</id>",
        "        <url>file://${project.basedir}/repo</url></repository></repositories>",
        "    (and the same under <pluginRepositories> for plugins).",
    ]
    if any(a == "maven-war-plugin" for _, a, _ in missing):
        lines += [
            "Debian packages no maven-war-plugin, so wars cannot be built here: package the app",
            "as a jar that starts an embedded Jetty 9 (org.eclipse.jetty:jetty-server and",
            "jetty-servlet 9.4.57.v20241219 are in the stack), like Flynn's examples/java.",
        ]
    return "\n".join(lines)


# --- the runnable jar ----------------------------------------------------------------------


def manifest(jar: Path) -> dict[str, str]:
    """The main attributes of a jar's manifest (continuation lines joined)."""
    try:
        with zipfile.ZipFile(jar) as archive:
            text = archive.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
    except (KeyError, OSError, zipfile.BadZipFile):
        return {}
    joined = re.sub(r"\r?\n ", "", text.replace("\r\n", "\n"))
    attrs: dict[str, str] = {}
    for line in joined.split("\n"):
        if not line.strip():
            break  # the main section ends at the first blank line
        key, sep, value = line.partition(": ")
        if sep:
            attrs[key] = value
    return attrs


def runnable_jar(build_dir: Path) -> Path | None:
    """target/*.jar with a Main-Class; a fat jar (assembly, shade) before a thin one."""
    target = build_dir / "target"
    jars = [
        p
        for p in sorted(target.glob("*.jar"))
        if not p.name.endswith(NOT_RUNNABLE) and not p.name.startswith("original-")
    ]
    runnable = [p for p in jars if manifest(p).get("Main-Class")]
    if not runnable:
        return None
    fat = [p for p in runnable if p.name.endswith(FAT_JAR_SUFFIXES)]
    return (fat or runnable)[0]


def shared_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many trailing path components `a` and `b` have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def copy_class_path(build_dir: Path, jar: Path, local_repo: Path) -> tuple[int, list[str]]:
    """Put each Class-Path entry of `jar` where the manifest says, from the local repository;
    returns how many were copied and the entries that could not be found."""
    entries = manifest(jar).get("Class-Path", "").split()
    index: dict[str, list[Path]] = {}
    for repo in (local_repo, DEBIAN_REPO):
        for path in repo.rglob("*.jar"):
            index.setdefault(path.name, []).append(path)
    copied, missing = 0, []
    for entry in entries:
        if "://" in entry or entry.startswith("/"):
            continue  # a URL or an absolute path: the app's business
        dest = (jar.parent / entry).resolve()
        if not dest.is_relative_to(build_dir.resolve()):
            missing.append(entry)
            continue
        if dest.exists():
            continue
        candidates = index.get(dest.name, [])
        if not candidates:
            missing.append(entry)
            continue
        # a repository-layout entry (.../org/eclipse/jetty/...) tells same-named jars apart
        source = max(candidates, key=lambda c: shared_tail(c.parts, Path(entry).parts))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        copied += 1
    return copied, missing


def has_web_process(build_dir: Path) -> bool:
    procfile = build_dir / "Procfile"
    if not procfile.is_file():
        return False
    return any(line.startswith("web:") for line in procfile.read_text().splitlines())


def web_command(build_dir: Path) -> str | None:
    jar = runnable_jar(build_dir)
    if jar is None:
        return None
    return f"java $JAVA_OPTS -jar {shlex.quote(str(jar.relative_to(build_dir)))}"


# --- the steps -----------------------------------------------------------------------------


def write_profile(build_dir: Path, home: Path) -> None:
    profile = build_dir / ".profile.d"
    profile.mkdir(exist_ok=True)
    (profile / "java.sh").write_text(
        "# written by Flynn's Java buildpack\n"
        f"export JAVA_HOME={shlex.quote(str(home))}\n"
        'export PATH="$JAVA_HOME/bin:$PATH"\n'
        f'export JAVA_OPTS="${{JAVA_OPTS:-{DEFAULT_JAVA_OPTS}}}"\n'
    )


def prepare_jar(build_dir: Path, local_repo: Path) -> None:
    """Find the jar the web process runs and put its Class-Path's dependencies beside it."""
    jar = runnable_jar(build_dir)
    if jar is not None:
        info(f"{jar.relative_to(build_dir)} (Main-Class {manifest(jar)['Main-Class']})")
        copied, unfound = copy_class_path(build_dir, jar, local_repo)
        if copied:
            info(f"copied {copied} dependencies named in its Class-Path from the Maven repository")
        for entry in unfound:
            warn(f"Class-Path entry {entry} is neither built nor in the Maven repository")
        return
    if has_web_process(build_dir):
        info("no runnable jar in target/: the Procfile's web process starts the app")
        return
    message = "No runnable jar in target/ (a jar whose manifest has Main-Class) and no Procfile\n"
    message += "with a web process.\n"
    wars = sorted(p.name for p in (build_dir / "target").glob("*.war"))
    if wars:
        message += f"The build made {', '.join(wars)}: wars are not run here (the stack has\n"
        message += "Jetty 9's libraries but no servlet container to deploy them in).\n"
    fail(message + NO_RUNNABLE_JAR_FIX)


def compile_app(build_dir: Path, cache_dir: Path, env_dir: Path) -> None:
    home = java_home()
    step(f"Using the stack's OpenJDK {JAVA_VERSION}")
    info(f"JAVA_HOME={home}")
    check_java_version(build_dir)
    exported = export_env_dir(env_dir)
    if exported:
        info(f"config vars exported to the build: {', '.join(exported)}")
    if (build_dir / "mvnw").exists():
        info("not running ./mvnw: it downloads Maven, and this cluster cannot reach the")
        info("download; the stack's Maven 3.8.7 builds the app instead")

    step("Building with Maven (offline, from Debian's Maven repository)")
    settings, local_repo = write_settings(cache_dir)
    cached = count_cached(local_repo)
    if cached:
        info(f"Using cached Maven repository ({cached} artifacts)")
    else:
        info("No cached Maven repository: filling one from Debian's")
    started = time.monotonic()
    code, output = run_maven(build_dir, settings)
    elapsed = time.monotonic() - started
    if code != 0:
        missing = missing_artifacts(output)
        if missing:
            fail(explain_missing(missing))
        fail(f"Maven failed (exit {code}): see its output above.")
    info(f"Maven finished in {elapsed:.1f} s")

    step("Preparing the runnable jar")
    prepare_jar(build_dir, local_repo)

    step("Writing .profile.d/java.sh")
    write_profile(build_dir, home)
    info(f"JAVA_HOME, PATH, JAVA_OPTS (default: {DEFAULT_JAVA_OPTS})")


def release(build_dir: Path) -> None:
    command = web_command(build_dir)
    print("---")
    if command is None:
        print("default_process_types: {}")
    else:
        print("default_process_types:")
        print(f"  web: {command}")


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[0] == "compile":
        compile_app(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif len(argv) == 2 and argv[0] == "release":
        release(Path(argv[1]))
    else:
        sys.exit("usage: java_buildpack.py compile BUILD_DIR CACHE_DIR ENV_DIR | release BUILD_DIR")


if __name__ == "__main__":
    main(sys.argv[1:])
