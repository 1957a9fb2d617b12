"""Build Flynn images from the recipes in this directory (see README.md).

    python packaging/images/build.py [--out DIR] [--cache DIR] [--force] [NAME...]

Each recipe `<name>.json` names its parent image and the Debian packages it adds. An image with
no parent is made by mmdebstrap; any other gets one new squashfs layer on top of its parent's
layers. The result is Flynn's on-disk image layout: `<out>/<name>/manifest.json` (id: `id`,
cache key: `key`) and `<out>/layers/<sha512_256>.squashfs`, shared by every image that uses it.

An image is rebuilt only when its cache key changes: sha256 of the recipe file, its parent's key
and BUILDER_VERSION. Run as root (it mounts, chroots and runs apt).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# flynn_host from this checkout even under a python without flynn-host installed, and this
# directory's own rootfs module even when build.py is imported rather than run (appended, so
# nothing already importable is shadowed)
for _path in (HERE, ROOT):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

import rootfs  # noqa: E402  (this directory's own module: trees, mounts, squashfs)

from flynn_host.runtime.images import (  # noqa: E402
    DEFAULT_PATH,
    LAYER_TYPE,
    MANIFEST_TYPE,
    PLATFORM,
    file_sha512_256,
    image_id,
    images_dir,
)

# Bump when a change to this builder changes what it produces, so every image is rebuilt.
BUILDER_VERSION = "1"
DEFAULT_OUT = images_dir()
DEFAULT_ENTRYPOINT = {"env": {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}, "cwd": "/",
                      "args": ["/bin/bash"]}  # fmt: skip

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
# key -> (check, what it must be, whether only a base image may have it)
FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "description": (lambda v: isinstance(v, str), "a string", False),
    "parent": (lambda v: v is None or isinstance(v, str), "an image name or null", False),
    "suite": (lambda v: isinstance(v, str) and bool(v), "a Debian suite", True),
    "variant": (lambda v: isinstance(v, str) and bool(v), "an mmdebstrap variant", True),
    "mirrors": (lambda v: _strings(v), "a list of strings", True),
    "dpkg_options": (lambda v: _strings(v), "a list of strings", True),
    "packages": (lambda v: _packages(v), "a list of Debian package names", False),
    "files": (lambda v: _files(v), "an object mapping absolute paths to file contents", False),
    "run": (lambda v: _commands(v), "a list of commands (each a list of strings)", False),
    "copy": (
        lambda v: _copies(v),
        "an object mapping absolute paths in the image to directories of this repository",
        False,
    ),
    "entrypoint": (lambda v: _entrypoint(v), "an object with env, cwd and/or args", False),
    "source_date_epoch": (lambda v: type(v) is int and v > 0, "a positive integer", False),
}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _packages(value: Any) -> bool:
    return _strings(value) and all(PACKAGE_RE.fullmatch(p) for p in value)


def _files(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(path, str) and path.startswith("/") and ".." not in path.split("/")
        and isinstance(text, str)
        for path, text in value.items()
    )  # fmt: skip


def _copies(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(dest, str) and dest.startswith("/") and ".." not in dest.split("/")
        and isinstance(src, str) and src and not src.startswith("/")
        and ".." not in src.split("/")
        for dest, src in value.items()
    )  # fmt: skip


def _commands(value: Any) -> bool:
    return isinstance(value, list) and all(_strings(argv) and argv for argv in value)


def _entrypoint(value: Any) -> bool:
    if not isinstance(value, dict) or not set(value) <= {"env", "cwd", "args"}:
        return False
    env = value.get("env", {})
    return (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        and isinstance(value.get("cwd", "/"), str)
        and _strings(value.get("args", []))
    )


class RecipeError(Exception):
    """A recipe is missing, malformed or names a parent that does not exist."""


# --- recipes and cache keys -------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str
    raw: bytes  # the file's bytes: what the cache key covers
    data: dict[str, Any]

    @property
    def parent(self) -> str | None:
        return self.data.get("parent")


def parse_recipe(name: str, raw: bytes) -> Recipe:
    """Validate a recipe's JSON; every mistake is a RecipeError naming the field."""
    if not NAME_RE.fullmatch(name) or name == "layers":
        raise RecipeError(f"invalid image name {name!r} (lower case letters, digits, - and _)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {name}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name}: must be a JSON object")
    if "parent" not in data:
        raise RecipeError(f"recipe {name}: 'parent' is required (null for a base image)")
    for key, value in data.items():
        if key not in FIELDS:
            raise RecipeError(f"recipe {name}: unknown field {key!r}")
        check, what, base_only = FIELDS[key]
        if not check(value):
            raise RecipeError(f"recipe {name}: {key!r} must be {what}")
        if base_only and data["parent"] is not None:
            raise RecipeError(f"recipe {name}: {key!r} is only for a base image (parent null)")
    if data["parent"] is None and not data.get("suite"):
        raise RecipeError(f"recipe {name}: a base image (parent null) needs a 'suite'")
    if data["parent"] == name:
        raise RecipeError(f"recipe {name}: an image cannot be its own parent")
    return Recipe(name, raw, data)


def load_recipes(directory: Path) -> dict[str, Recipe]:
    return {p.stem: parse_recipe(p.stem, p.read_bytes()) for p in sorted(directory.glob("*.json"))}


def build_order(recipes: dict[str, Recipe], names: list[str]) -> list[str]:
    """`names` and their ancestors, each parent before its children."""
    order: list[str] = []

    def visit(name: str, chain: list[str]) -> None:
        if name in order:
            return
        if name in chain:
            raise RecipeError(f"recipes form a cycle: {' -> '.join([*chain, name])}")
        if name not in recipes:
            why = f" (the parent of {chain[-1]})" if chain else ""
            raise RecipeError(f"no recipe for image {name!r}{why}")
        parent = recipes[name].parent
        if parent is not None:
            visit(parent, [*chain, name])
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def cache_keys(recipes: dict[str, Recipe], order: list[str]) -> dict[str, str]:
    """Each image's cache key: its recipe's bytes, the trees it copies in, its parent's key
    and BUILDER_VERSION."""
    keys: dict[str, str] = {}
    for name in order:
        parent = recipes[name].parent
        h = hashlib.sha256(f"flynn-image {BUILDER_VERSION}\0".encode())
        h.update((keys[parent] if parent else "").encode() + b"\0")
        h.update(recipes[name].raw)
        for dest, src in sorted((recipes[name].data.get("copy") or {}).items()):
            h.update(f"{dest}\0".encode())
            tree_digest(ROOT / src, h)
        keys[name] = h.hexdigest()
    return keys


def tree_digest(root: Path, h: Any) -> None:
    """Feed `h` every file under `root` as it will be copied: relative path, whether it is
    executable, contents (caches and dot-files are not copied, see rootfs.copy_tree)."""
    if not root.is_dir():
        raise RecipeError(f"copy: {root} is not a directory of this repository")
    for path in sorted(rootfs.copied_files(root)):
        rel = path.relative_to(root).as_posix()
        executable = os.access(path, os.X_OK)
        h.update(f"{rel}\0{int(executable)}\0".encode())
        h.update(path.read_bytes())


def entrypoint_for(recipes: dict[str, Recipe], name: str) -> dict[str, Any]:
    """The `_default` entrypoint: the parent's (or the default), with the recipe's on top."""
    parent = recipes[name].parent
    base = entrypoint_for(recipes, parent) if parent else DEFAULT_ENTRYPOINT
    own = recipes[name].data.get("entrypoint") or {}
    merged = json.loads(json.dumps(base))
    merged["env"].update(own.get("env") or {})
    merged.update({k: v for k, v in own.items() if k != "env"})
    return merged


def source_date_epoch(recipe: Recipe, now: float | None = None) -> int:
    """The recipe's pinned SOURCE_DATE_EPOCH, else the start of the current UTC day: builds
    from one recipe on one day (against an unchanged mirror) give identical layers."""
    pinned = recipe.data.get("source_date_epoch")
    if pinned:
        return int(pinned)
    return int(time.time() if now is None else now) // 86400 * 86400


def make_manifest(layers: list[dict[str, Any]], entrypoint: dict[str, Any]) -> dict[str, Any]:
    return {
        "_type": MANIFEST_TYPE,
        "meta": {},
        "entrypoints": {"_default": entrypoint},
        "rootfs": [{"platform": dict(PLATFORM), "layers": layers}],
    }


def layer_entry(path: Path) -> dict[str, Any]:
    digest = file_sha512_256(path)
    return {
        "id": digest,
        "type": LAYER_TYPE,
        "length": path.stat().st_size,
        "hashes": {"sha512_256": digest},
        "meta": {},
    }


def manifest_layers(out: Path, name: str) -> list[dict[str, Any]]:
    manifest = json.loads((out / name / "manifest.json").read_text())
    return manifest["rootfs"][0]["layers"]


def is_cached(out: Path, name: str, key: str) -> bool:
    """The image was built from this key and all its layers are present."""
    try:
        if (out / name / "key").read_text().strip() != key:
            return False
        layers = manifest_layers(out, name)
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return all((out / "layers" / f"{layer['id']}.squashfs").is_file() for layer in layers)


# --- building ---------------------------------------------------------------------------------


class Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, name: str, message: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {name}: {message}", flush=True)


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    # The same lock as the busybox builder's (flynn_host.dev.busybox): one builder at a time per
    # directory.
    with open(out / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def remove_build_dir(work: Path) -> None:
    """Unmount whatever is still mounted under `work` (deepest first), then delete it."""
    for point in sorted(rootfs.mounted_under(work), key=len, reverse=True):
        subprocess.run(["umount", "-d", "-l", point], capture_output=True)
    rootfs.remove_tree(work)


def build_image(
    recipes: dict[str, Recipe], name: str, key: str, out: Path, cache: Path, progress: Progress
) -> None:
    """Build one image (its parent already built) and swap it into `out`."""
    recipe = recipes[name]

    def say(message: str) -> None:
        progress.say(name, message)

    started = time.monotonic()
    (out / ".logs").mkdir(exist_ok=True)
    log = out / ".logs" / f"{name}.log"
    log.write_text(f"building {name}, key {key}\n")
    say(f"building (key {key[:12]}, log {log})")
    runner = rootfs.Runner(log, say)
    mounts = rootfs.Mounts(runner)
    sde = source_date_epoch(recipe)
    work = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=out))
    try:
        parent_layers: list[dict[str, Any]] = []
        if recipe.parent is None:
            tree = rootfs.build_base_tree(runner, work, recipe.data, cache, sde, mounts)
        else:
            parent_layers = manifest_layers(out, recipe.parent)
            files = [out / "layers" / f"{layer['id']}.squashfs" for layer in parent_layers]
            tree = rootfs.build_child_tree(
                runner, work, files, recipe.data, cache, sde, mounts, source_root=ROOT
            )
        runner.step(f"clamping mtimes to SOURCE_DATE_EPOCH={sde}")
        rootfs.finish_tree(tree, sde, overlay_upper=bool(parent_layers))
        runner.step("mksquashfs")
        squashfs = work / "layer.squashfs"
        rootfs.make_layer(runner, tree, squashfs)
        layer = layer_entry(squashfs)
        # Layers first (content-addressed: replacing one with itself is harmless), then the
        # image directory is swapped in whole, so a crash leaves the old image or none.
        os.replace(squashfs, out / "layers" / f"{layer['id']}.squashfs")
        manifest = make_manifest([*parent_layers, layer], entrypoint_for(recipes, name))
        new = work / "image"
        new.mkdir()
        (new / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (new / "id").write_text(image_id(manifest) + "\n")
        (new / "key").write_text(key + "\n")
        if (out / name).exists():
            (out / name).rename(work / "old")
        new.rename(out / name)
        say(
            f"built in {time.monotonic() - started:.0f}s: layer {layer['id'][:12]} "
            f"{layer['length'] / 1e6:.1f} MB, image {image_id(manifest)[:12]}"
        )
    finally:
        try:
            mounts.unmount_all()
        finally:
            remove_build_dir(work)


def prune_layers(out: Path, progress: Progress) -> None:
    """Delete layers that no image in `out` refers to (left behind by changed recipes)."""
    used = set()
    for manifest in out.glob("*/manifest.json"):
        for rootfs_entry in json.loads(manifest.read_text()).get("rootfs") or []:
            used.update(layer["id"] for layer in rootfs_entry.get("layers") or [])
    for layer in sorted((out / "layers").glob("*.squashfs")):
        if layer.name.removesuffix(".squashfs") not in used:
            size = layer.stat().st_size
            layer.unlink()
            progress.say("prune", f"removed unused layer {layer.name[:12]} ({size / 1e6:.1f} MB)")


def build(
    names: list[str], out: Path, cache: Path, recipes_dir: Path, force: bool, prune: bool = False
) -> None:
    recipes = load_recipes(recipes_dir)
    order = build_order(recipes, names or sorted(recipes))
    keys = cache_keys(recipes, order)
    progress = Progress()
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers").mkdir(exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        for stale in out.glob(".build-*"):  # left by a builder that was killed
            if stale.is_dir():
                progress.say("builder", f"removing {stale.name}, left by an interrupted build")
                remove_build_dir(stale)
        for name in order:
            if not force and is_cached(out, name, keys[name]):
                progress.say(name, f"up to date (key {keys[name][:12]})")
                continue
            build_image(recipes, name, keys[name], out, cache, progress)
        if prune:
            prune_layers(out, progress)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP clean up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build.py", description="Build Flynn images from Debian packages."
    )
    parser.add_argument("names", nargs="*", help="images to build (default: every recipe)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"images directory (default $FLYNN_IMAGES or {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="apt package cache kept between builds (default OUT/.cache/apt)",
    )
    parser.add_argument("--recipes", type=Path, default=HERE, help="recipes directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--prune", action="store_true", help="then delete layers no image in OUT uses"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("build.py: must run as root (it mounts filesystems and chroots)", file=sys.stderr)
        return 1
    missing = [t for t in ("mmdebstrap", "mksquashfs", "chroot") if not shutil.which(t)]
    if missing:
        print(
            f"build.py: missing {', '.join(missing)}: apt-get install mmdebstrap squashfs-tools",
            file=sys.stderr,
        )
        return 1
    out = args.out.absolute()
    cache = (args.cache or out / ".cache" / "apt").absolute()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        rootfs.enter_private_mount_namespace()
        build(args.names, out, cache, args.recipes, args.force, args.prune)
    except (RecipeError, rootfs.BuildError, OSError) as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build.py: interrupted; build directories removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
