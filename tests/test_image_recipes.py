"""The image recipes in packaging/images/ and their builder: recipe checks, cache keys, manifest
layer order and how a layer is packed (fast); then real images run as real jobs (slow: they use
the images in $FLYNN_IMAGES or var/images, building them first if they are missing or stale)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from flynn_host.dev.host import wait_for
from flynn_host.runtime import images

from .conftest import IMAGES, ROOT, needs_root

RECIPES = ROOT / "packaging" / "images"
BUILDER = RECIPES / "build.py"


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flynn_image_build", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


build = _load_builder()
rootfs = build.rootfs


def recipes_of(**texts: str) -> dict[str, Any]:
    return {name: build.parse_recipe(name, text.encode()) for name, text in texts.items()}


BASE = '{"parent": null, "suite": "bookworm", "packages": ["ca-certificates"]}'
CHILD = '{"parent": "base", "packages": ["git"]}'


# --- recipes ----------------------------------------------------------------------------------


def test_the_shipped_recipes_parse_and_share_base() -> None:
    recipes = build.load_recipes(RECIPES)
    assert {"base", "components", "stack"} <= set(recipes)
    assert recipes["base"].parent is None
    assert recipes["components"].parent == "base"
    assert recipes["stack"].parent == "base"
    assert build.build_order(recipes, ["stack", "components"]) == ["base", "stack", "components"]
    components = recipes["components"].data["packages"]
    for package in ("etcd-server", "postgresql-15", "patroni", "python3", "git", "iproute2"):
        assert package in components
    stack = recipes["stack"].data["packages"]
    for package in ("nodejs", "npm", "golang-go", "ruby", "php-cli", "python3-venv"):
        assert package in stack


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "must be a JSON object"),
        ("{", "invalid JSON"),
        ('{"packages": []}', "'parent' is required"),
        ('{"parent": null}', "needs a 'suite'"),
        ('{"parent": "base", "packges": []}', "unknown field 'packges'"),
        ('{"parent": "base", "variant": "minbase"}', "only for a base image"),
        ('{"parent": "base", "packages": ["git; rm -rf /"]}', "Debian package names"),
        ('{"parent": "base", "packages": "git"}', "Debian package names"),
        ('{"parent": "base", "files": {"etc/x": "y"}}', "absolute paths"),
        ('{"parent": "base", "files": {"/etc/../x": "y"}}', "absolute paths"),
        ('{"parent": "base", "run": ["rm -rf /tmp/x"]}', "list of commands"),
        ('{"parent": "base", "entrypoint": {"user": "x"}}', "env, cwd and/or args"),
        ('{"parent": "base", "entrypoint": {"env": {"N": 1}}}', "env, cwd and/or args"),
        ('{"parent": "x"}', "its own parent"),
    ],
)
def test_bad_recipes_are_refused_with_the_field_named(text: str, message: str) -> None:
    with pytest.raises(build.RecipeError, match="recipe x: .*" + message.replace("(", r"\(")):
        build.parse_recipe("x", text.encode())


def test_image_names_are_checked() -> None:
    for name in ("layers", "Base", ".hidden", "a/b"):
        with pytest.raises(build.RecipeError, match="invalid image name"):
            build.parse_recipe(name, BASE.encode())


def test_build_order_puts_parents_first_and_reports_missing_parents_and_cycles() -> None:
    recipes = recipes_of(base=BASE, child=CHILD, grandchild='{"parent": "child"}')
    assert build.build_order(recipes, ["grandchild"]) == ["base", "child", "grandchild"]
    assert build.build_order(recipes, ["base", "child"]) == ["base", "child"]
    with pytest.raises(build.RecipeError, match="no recipe for image 'nope'"):
        build.build_order(recipes, ["nope"])
    orphan = recipes_of(orphan='{"parent": "gone"}')
    with pytest.raises(build.RecipeError, match="'gone' \\(the parent of orphan\\)"):
        build.build_order(orphan, ["orphan"])
    loop = recipes_of(a='{"parent": "b"}', b='{"parent": "a"}')
    with pytest.raises(build.RecipeError, match="cycle: a -> b -> a"):
        build.build_order(loop, ["a"])


# --- cache keys -------------------------------------------------------------------------------


def test_cache_key_follows_the_recipe_and_its_parent_only() -> None:
    order = ["base", "child", "other"]
    before = build.cache_keys(recipes_of(base=BASE, child=CHILD, other=CHILD), order)
    assert before == build.cache_keys(recipes_of(base=BASE, child=CHILD, other=CHILD), order)
    # a changed child changes only its own key
    changed = build.cache_keys(
        recipes_of(base=BASE, child=CHILD.replace("git", "curl"), other=CHILD), order
    )
    assert changed["base"] == before["base"] and changed["other"] == before["other"]
    assert changed["child"] != before["child"]
    # a changed base changes every key below it
    rebased = build.cache_keys(
        recipes_of(base=BASE.replace("]", ', "netbase"]'), child=CHILD, other=CHILD), order
    )
    assert all(rebased[name] != before[name] for name in order)
    # the key covers the file's bytes, not only its meaning
    spaced = build.cache_keys(recipes_of(base=BASE + "\n", child=CHILD, other=CHILD), order)
    assert spaced["base"] != before["base"]


def test_cache_key_changes_with_the_builder_version(monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = recipes_of(base=BASE)
    before = build.cache_keys(recipes, ["base"])
    monkeypatch.setattr(build, "BUILDER_VERSION", build.BUILDER_VERSION + "-next")
    assert build.cache_keys(recipes, ["base"]) != before


def _fake_image(out: Path, name: str, key: str, layer_ids: list[str]) -> None:
    layers = [
        {"id": i, "type": images.LAYER_TYPE, "length": 1, "hashes": {"sha512_256": i}, "meta": {}}
        for i in layer_ids
    ]
    (out / name).mkdir(parents=True)
    (out / name / "manifest.json").write_text(json.dumps(build.make_manifest(layers, {})))
    (out / name / "key").write_text(key + "\n")
    (out / "layers").mkdir(exist_ok=True)


def test_cached_needs_the_same_key_and_every_layer(tmp_path: Path) -> None:
    _fake_image(tmp_path, "child", "k1", ["a" * 64, "b" * 64])
    assert not build.is_cached(tmp_path, "child", "k1")  # no layer files yet
    (tmp_path / "layers" / f"{'a' * 64}.squashfs").write_bytes(b"x")
    assert not build.is_cached(tmp_path, "child", "k1")  # one is still missing
    (tmp_path / "layers" / f"{'b' * 64}.squashfs").write_bytes(b"x")
    assert build.is_cached(tmp_path, "child", "k1")
    assert not build.is_cached(tmp_path, "child", "k2")
    assert not build.is_cached(tmp_path, "missing", "k1")


# --- manifests --------------------------------------------------------------------------------


def test_manifest_lists_the_parent_layers_first(tmp_path: Path) -> None:
    base_layer, own_layer = tmp_path / "base.squashfs", tmp_path / "own.squashfs"
    base_layer.write_bytes(b"base layer")
    own_layer.write_bytes(b"component layer")
    layers = [build.layer_entry(base_layer), build.layer_entry(own_layer)]
    assert layers[0]["id"] == images.file_sha512_256(base_layer)
    assert layers[1]["length"] == len(b"component layer")
    manifest = build.make_manifest(layers, build.DEFAULT_ENTRYPOINT)
    assert manifest["_type"] == images.MANIFEST_TYPE
    assert images.entrypoint(manifest)["args"] == ["/bin/bash"]
    specs = images.mountspecs_for(manifest, "file:///images/layers/{id}.squashfs")
    assert [s["id"] for s in specs] == [layers[0]["id"], layers[1]["id"]]  # bottom first
    assert specs[0]["url"] == f"file:///images/layers/{layers[0]['id']}.squashfs"


def test_entrypoint_is_inherited_and_overridden() -> None:
    recipes = recipes_of(
        base=BASE,
        child='{"parent": "base", "entrypoint": {"env": {"GOPATH": "/go"}, "cwd": "/app"}}',
        grandchild='{"parent": "child", "entrypoint": {"args": ["/bin/sh"]}}',
    )
    assert build.entrypoint_for(recipes, "base") == build.DEFAULT_ENTRYPOINT
    ep = build.entrypoint_for(recipes, "grandchild")
    assert ep["env"] == {**build.DEFAULT_ENTRYPOINT["env"], "GOPATH": "/go"}
    assert (ep["cwd"], ep["args"]) == ("/app", ["/bin/sh"])
    assert build.DEFAULT_ENTRYPOINT["env"].keys() == {"PATH", "LANG"}  # not mutated


def test_source_date_epoch_is_the_day_or_the_pinned_value() -> None:
    day = 1_700_000_000 // 86400 * 86400
    recipe = build.parse_recipe("base", BASE.encode())
    assert build.source_date_epoch(recipe, now=1_700_000_000) == day
    assert build.source_date_epoch(recipe, now=day + 86399) == day
    pinned = build.parse_recipe("x", b'{"parent": "base", "source_date_epoch": 1234}')
    assert build.source_date_epoch(pinned, now=1_700_000_000) == 1234


# --- trees and layers -------------------------------------------------------------------------


def test_clean_removes_logs_caches_and_backups(tmp_path: Path) -> None:
    keep = [
        "etc/hostname",
        "var/lib/dpkg/status",
        "var/log/postgresql",
        "var/cache/debconf/config.dat",
    ]
    drop = [
        "var/log/dpkg.log",
        "var/log/apt/history.log",
        "var/lib/dpkg/status-old",
        "var/cache/debconf/config.dat-old",
        "var/cache/ldconfig/aux-cache",
        "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
        "tmp/x",
    ]
    for name in keep + drop:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name == "var/log/postgresql":
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("x")
    rootfs.clean(tmp_path)
    assert all((tmp_path / name).exists() for name in keep)
    assert not any((tmp_path / name).exists() for name in drop)


def test_write_files_creates_parents(tmp_path: Path) -> None:
    rootfs.write_files(tmp_path, {"/etc/postgresql-common/createcluster.d/flynn.conf": "x = 1\n"})
    path = tmp_path / "etc/postgresql-common/createcluster.d/flynn.conf"
    assert path.read_text() == "x = 1\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.parent.stat().st_mode & 0o777 == 0o755


def test_write_files_never_follows_a_symlink_out_of_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    with pytest.raises(rootfs.BuildError, match="/etc is a symlink"):
        rootfs.write_files(root, {"/etc/hosts": "x"})
    (root / "mtab").symlink_to(outside / "mounts")
    with pytest.raises(rootfs.BuildError, match="/mtab is a symlink"):
        rootfs.write_files(root, {"/mtab": "x"})
    assert list(outside.iterdir()) == []


def test_prune_removes_only_layers_no_image_uses(tmp_path: Path) -> None:
    used, unused = "a" * 64, "c" * 64
    _fake_image(tmp_path, "child", "k", [used])
    for layer in (used, unused):
        (tmp_path / "layers" / f"{layer}.squashfs").write_bytes(b"x")
    build.prune_layers(tmp_path, build.Progress())
    assert [p.name for p in (tmp_path / "layers").iterdir()] == [f"{used}.squashfs"]


@needs_root
def test_a_layer_keeps_whiteouts_opaque_dirs_owners_and_old_mtimes(tmp_path: Path) -> None:
    """What an overlay upper dir holds survives finish_tree and mksquashfs, and the overlay's
    bookkeeping xattrs do not."""
    upper = tmp_path / "upper"
    (upper / "etc/apt/apt.conf.d").mkdir(parents=True)
    (upper / "etc/apt/apt.conf.d/99new").write_text("new\n")
    os.setxattr(upper / "etc/apt/apt.conf.d", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "etc/apt", "trusted.overlay.impure", b"y")
    os.mknod(upper / "etc/issue.net", 0o20000, os.makedev(0, 0))  # a whiteout
    (upper / "old.py").write_text("old\n")
    os.utime(upper / "old.py", (1000, 1000))
    (upper / "data").mkdir()
    os.chown(upper / "data", 105, 108)
    rootfs.finish_tree(upper, 2_000_000, overlay_upper=True)
    assert os.stat(upper / "old.py").st_mtime == 1000  # older than the epoch: kept
    assert os.stat(upper / "etc/apt/apt.conf.d/99new").st_mtime == 2_000_000  # clamped
    assert os.listxattr(upper / "etc/apt") == []
    runner = rootfs.Runner(tmp_path / "log", say=lambda message: None)
    rootfs.make_layer(runner, upper, tmp_path / "layer.squashfs")
    listing = subprocess.run(
        ["unsquashfs", "-lln", str(tmp_path / "layer.squashfs")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = {}
    for line in listing.splitlines():
        if line.startswith(("c", "d", "-")):
            entries[line.split()[-1].removeprefix("squashfs-root")] = line.split()
    assert entries["/etc/issue.net"][0].startswith("c")  # a character device 0, 0
    assert entries["/etc/issue.net"][2:4] == ["0,", "0"]
    assert entries["/data"][1] == "105/108"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "squashfs", "-o", "loop,ro", str(tmp_path / "layer.squashfs"), str(mnt)],
        check=True,
    )
    try:
        assert os.getxattr(mnt / "etc/apt/apt.conf.d", "trusted.overlay.opaque") == b"y"
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True)


# --- real images (slow) -----------------------------------------------------------------------


def run_builder(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILDER), "--out", str(IMAGES), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def built_images() -> Path:
    """base, components and stack in IMAGES: reused when up to date, else built (minutes)."""
    result = run_builder("base", "components", "stack")
    assert result.returncode == 0, result.stdout + result.stderr
    return IMAGES


def run_in(daemon: Any, image: str, args: list[str], **config: Any) -> tuple[int, str]:
    """Run `args` in a job of `image`; its exit status and output (stdout and stderr). A job
    with bind `mounts` runs in the system partition, the only one that may have them."""
    manifest, _ = images.load_manifest(image, IMAGES)
    entry = images.entrypoint(manifest)
    job_id = daemon.new_job_id()
    job = {
        **({"partition": "system"} if config.get("mounts") else {}),
        "id": job_id,
        "mountspecs": images.mountspecs_for(manifest, images.local_layer_template(IMAGES)),
        "config": {"args": args, "env": entry["env"], "working_dir": entry["cwd"], **config},
        "resources": {},
    }
    daemon.client.add_job(job)
    final = daemon.wait_job(job_id, timeout=120)
    return final.get("exit_status", -1), daemon.run_cli("log", job_id).stdout


def check_commands(daemon: Any, image: str, commands: dict[str, str]) -> None:
    failures = []
    for command, expected in commands.items():
        status, out = run_in(daemon, image, command.split())
        if status != 0 or expected not in out:
            failures.append(f"{command}: exit {status}, output {out[:300]!r}")
    assert not failures, f"in {image}:\n" + "\n".join(failures)


@pytest.mark.slow
@needs_root
def test_base_is_bookworm(built_images: Path, make_daemon: Any) -> None:
    d = make_daemon()
    check_commands(
        d,
        "base",
        {
            "cat /etc/os-release": "VERSION_CODENAME=bookworm",
            "ls /etc/ssl/certs/ca-certificates.crt": "ca-certificates.crt",
        },
    )
    manifest, _ = images.load_manifest("base", IMAGES)
    assert len(manifest["rootfs"][0]["layers"]) == 1


@pytest.mark.slow
@needs_root
def test_components_run_the_platform_services(built_images: Path, make_daemon: Any) -> None:
    d = make_daemon()
    check_commands(
        d,
        "components",
        {
            "etcd --version": "etcd Version: 3.",
            "etcdctl version": "etcdctl version: 3.",
            "/usr/lib/postgresql/15/bin/postgres --version": "(PostgreSQL) 15.",
            "patroni --version": "patroni 3.",
            "git --version": "git version 2.",
            "ip -V": "iproute2",
            "python3.11 --version": "Python 3.11",
        },
    )
    # no default cluster, no snakeoil key baked into the image
    status, out = run_in(d, "components", ["sh", "-c", "ls /etc/postgresql /etc/ssl/private"])
    assert status == 0 and out.split() == ["/etc/postgresql:", "/etc/ssl/private:"], out
    base, _ = images.load_manifest("base", IMAGES)
    components, _ = images.load_manifest("components", IMAGES)
    assert components["rootfs"][0]["layers"][0] == base["rootfs"][0]["layers"][0]


@pytest.mark.slow
@needs_root
def test_components_run_flynn_host_from_the_host_venv(built_images: Path, make_daemon: Any) -> None:
    venv_python = Path(sys.prefix) / "bin" / "python"
    if sys.prefix == sys.base_prefix or not str(venv_python).startswith(str(ROOT)):
        pytest.skip("tests are not running from the checkout's virtualenv")
    d = make_daemon()
    mount = {"location": str(ROOT), "target": str(ROOT), "writeable": False}
    code = "import aiohttp, frozenlist._frozenlist, flynn_host.daemon, sys; print(sys.version)"
    status, out = run_in(d, "components", [str(venv_python), "-c", code], mounts=[mount])
    assert status == 0 and out.startswith("3.11"), out


@pytest.mark.slow
@needs_root
def test_stack_builds_and_runs_apps(built_images: Path, make_daemon: Any) -> None:
    d = make_daemon()
    check_commands(
        d,
        "stack",
        {
            "node --version": "v18.",
            "npm --version": "9.",
            "python3 --version": "Python 3.11",
            "pip3 --version": "pip ",
            "go version": "go version go1.",
            "ruby --version": "ruby 3.",
            "bundle --version": "Bundler version",
            "php --version": "PHP 8.2",
            "java -version": 'openjdk version "17',
            "javac -version": "javac 17",
            "gcc --version": "gcc (Debian 12",
            "git --version": "git version 2.",
        },
    )


@pytest.fixture
def whiteout_recipes(tmp_path: Path, built_images: Path) -> Any:
    """A recipe directory with the real base and a child that deletes and replaces things;
    the child image and its layer are removed from IMAGES afterwards."""
    (tmp_path / "base.json").write_bytes((RECIPES / "base.json").read_bytes())
    (tmp_path / "test-whiteouts.json").write_text(
        json.dumps(
            {
                "parent": "base",
                "run": [
                    ["rm", "/etc/issue.net"],
                    ["rm", "-r", "/etc/skel"],
                    ["rm", "-r", "/etc/apt/apt.conf.d"],
                    ["mkdir", "/etc/apt/apt.conf.d"],
                    ["touch", "/etc/apt/apt.conf.d/99flynn-test"],
                ],
            }
        )
    )
    yield tmp_path
    image_dir = IMAGES / "test-whiteouts"
    if (image_dir / "manifest.json").exists():
        layers = build.manifest_layers(IMAGES, "test-whiteouts")
        (IMAGES / "layers" / f"{layers[-1]['id']}.squashfs").unlink(missing_ok=True)
    for name in ("manifest.json", "id", "key"):
        (image_dir / name).unlink(missing_ok=True)
    if image_dir.exists():
        image_dir.rmdir()
    (IMAGES / ".logs" / "test-whiteouts.log").unlink(missing_ok=True)


@pytest.mark.slow
@needs_root
def test_deletions_in_a_child_layer_are_honoured(whiteout_recipes: Path, make_daemon: Any) -> None:
    result = run_builder("--recipes", str(whiteout_recipes), "test-whiteouts", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "base: up to date" in result.stdout  # the same base.json bytes: the same key
    d = make_daemon()
    script = (
        "ls -A /etc/apt/apt.conf.d; "
        "for f in issue.net skel issue; do test -e /etc/$f && echo $f; done"
    )
    status, out = run_in(d, "base", ["sh", "-c", script])
    assert status == 0 and {"01autoremove", "issue.net", "skel", "issue"} <= set(out.split())
    status, out = run_in(d, "test-whiteouts", ["sh", "-c", script])
    assert status == 0 and out.split() == ["99flynn-test", "issue"], out


@pytest.mark.slow
@needs_root
def test_second_run_reuses_the_cache_and_removes_stale_build_dirs(built_images: Path) -> None:
    stale = IMAGES / ".build-stack-stale"
    (stale / "upper").mkdir(parents=True)
    result = run_builder("base", "components", "stack", timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("base", "components", "stack"):
        assert f"{name}: up to date" in result.stdout
    assert "building" not in result.stdout
    assert not stale.exists()


def chroot_sleep_running() -> bool:
    """Whether a `sleep 60` runs chrooted into a build directory of IMAGES."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline, root = (proc / "cmdline").read_bytes(), os.readlink(proc / "root")
        except OSError:  # not a process, or gone
            continue
        if cmdline == b"sleep\x0060\x00" and root.startswith(f"{IMAGES}/.build-"):
            return True
    return False


@pytest.mark.slow
@needs_root
def test_an_interrupted_build_leaves_no_mount_loop_device_or_directory(
    tmp_path: Path, built_images: Path
) -> None:
    (tmp_path / "base.json").write_bytes((RECIPES / "base.json").read_bytes())
    (tmp_path / "test-interrupt.json").write_text('{"parent": "base", "run": [["sleep", "60"]]}')
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BUILDER),
            "--out",
            str(IMAGES),
            "--recipes",
            str(tmp_path),
            "test-interrupt",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "running 1 commands" in line:
                break
        # interrupted while `sleep` runs in the chroot, over a loop-mounted base layer
        wait_for(chroot_sleep_running, 30, "sleep 60 in the build's chroot")
        proc.send_signal(signal.SIGINT)
        # the clean-up unmounts lazily and detaches loop devices: quick, unless the machine
        # is busy; what is checked is that it happens, not how fast
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(
                f"the builder did not stop: {proc.communicate()[0][-2000:]}"
            ) from None
        assert code == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(IMAGES.glob(".build-*"))
    assert not (IMAGES / "test-interrupt").exists()
    with open("/proc/mounts") as f:
        assert str(IMAGES) not in f.read()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(IMAGES) not in loops
    (IMAGES / ".logs" / "test-interrupt.log").unlink(missing_ok=True)


def test_cache_key_follows_the_trees_a_recipe_copies_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "runner"
    tree.mkdir()
    (tree / "init").write_text("#!/bin/sh\n")
    (tree / "__pycache__").mkdir()
    monkeypatch.setattr(build, "ROOT", tmp_path)
    order = ["base", "child"]
    child = '{"parent": "base", "copy": {"/runner": "runner"}}'
    before = build.cache_keys(recipes_of(base=BASE, child=child), order)
    (tree / "__pycache__" / "x.pyc").write_bytes(b"ignored")
    assert build.cache_keys(recipes_of(base=BASE, child=child), order) == before
    (tree / "init").chmod(0o755)
    made_executable = build.cache_keys(recipes_of(base=BASE, child=child), order)
    assert made_executable["child"] != before["child"]
    (tree / "init").write_text("#!/bin/sh\necho changed\n")
    edited = build.cache_keys(recipes_of(base=BASE, child=child), order)
    assert edited["child"] not in (before["child"], made_executable["child"])
    assert edited["base"] == before["base"]


@pytest.mark.parametrize(
    "copy",
    ['{"runner": "runner"}', '{"/runner": "/etc"}', '{"/runner": "../x"}', '["runner"]'],
)
def test_copy_must_map_image_paths_to_repository_directories(copy: str) -> None:
    with pytest.raises(build.RecipeError, match="'copy' must be"):
        recipes_of(child=f'{{"parent": "base", "copy": {copy}}}')


def test_copy_tree_copies_owned_by_root_with_plain_modes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "run").write_text("#!/bin/sh\n")
    (src / "bin" / "run").chmod(0o700)
    (src / "notes").write_text("x")
    (src / "notes").chmod(0o600)
    (src / ".hidden").write_text("x")
    (src / "tests").mkdir()
    (src / "tests" / "t.py").write_text("x")
    dest = tmp_path / "root" / "builder"
    rootfs.copy_tree(src, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "bin",
        "bin/run",
        "notes",
    ]
    assert (dest / "bin" / "run").stat().st_mode & 0o777 == 0o755
    assert (dest / "notes").stat().st_mode & 0o777 == 0o644
