"""The "busybox" test image: a one-layer Flynn image made from the host's own static busybox,
reproducible (the same busybox and recipe give the same layer and image id) and cached in the
images directory until either changes. Tests, the demo and benchmarks run their jobs in it.

Run `python -m flynn_host.dev.busybox --dir DIR` to build (or find cached) the image; it prints
the manifest path (`make images` does).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flynn_host.runtime import images

# Bump when the busybox rootfs recipe below changes, so cached images are rebuilt.
RECIPE_VERSION = "1"
BUSYBOX = Path("/bin/busybox")

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _busybox_rootfs(root: Path, busybox: Path) -> None:
    # Modes are set explicitly: they go into the image, and must not depend on the umask.
    root.chmod(0o755)
    for name, mode in (
        ("bin", 0o755),
        ("etc", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("root", 0o700),
        ("tmp", 0o1777),
    ):
        (root / name).mkdir()
        (root / name).chmod(mode)
    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    listing = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    for applet in sorted(set(listing.stdout.split())):
        if applet != "busybox" and "/" not in applet:
            (root / "bin" / applet).symlink_to("busybox")
    for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("resolv.conf", "")):
        (root / "etc" / name).write_text(text)
        (root / "etc" / name).chmod(0o644)


@contextmanager
def _build_lock(images_dir: Path) -> Iterator[None]:
    # Two builders (make, a test run, the demo) must not swap directories under each other.
    with open(images_dir / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _cached(image_dir: Path, key: str, images_dir: Path) -> bool:
    try:
        if (image_dir / "key").read_text().strip() != key:
            return False
        manifest = json.loads((image_dir / "manifest.json").read_text())
        layers = manifest["rootfs"][0]["layers"]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return all((images_dir / "layers" / f"{layer['id']}.squashfs").exists() for layer in layers)


def build_busybox_image(images_dir: Path, force: bool = False, busybox: Path = BUSYBOX) -> Path:
    """Build the "busybox" test image into `images_dir` (layer in `layers/<sha512_256>.squashfs`,
    manifest, id and cache key in `busybox/`) and return the manifest path. Reuses the existing
    image when the busybox binary and the recipe are unchanged, unless `force`."""
    images_dir = images_dir.absolute()
    image_dir = images_dir / "busybox"
    key = hashlib.sha256(busybox.read_bytes() + b"\0" + RECIPE_VERSION.encode()).hexdigest()
    (images_dir / "layers").mkdir(parents=True, exist_ok=True)
    with _build_lock(images_dir):
        if not force and _cached(image_dir, key, images_dir):
            return image_dir / "manifest.json"
        with tempfile.TemporaryDirectory(dir=images_dir, prefix=".build-busybox-") as tmp:
            work = Path(tmp)
            (work / "rootfs").mkdir()
            _busybox_rootfs(work / "rootfs", busybox)
            squashfs = work / "layer.squashfs"
            images.make_squashfs(work / "rootfs", squashfs)
            digest = images.file_sha512_256(squashfs)
            layer = {
                "id": digest,
                "type": images.LAYER_TYPE,
                "length": squashfs.stat().st_size,
                "hashes": {"sha512_256": digest},
                "meta": {},
            }
            manifest = {
                "_type": images.MANIFEST_TYPE,
                "meta": {},
                "entrypoints": {
                    "_default": {
                        "env": {"PATH": images.DEFAULT_PATH},
                        "cwd": "/",
                        "args": ["/bin/sh"],
                    }
                },
                "rootfs": [{"platform": dict(images.PLATFORM), "layers": [layer]}],
            }
            # The layer goes in first (content-addressed, so replacing it is harmless), then the
            # image directory is swapped in whole: a crash leaves the old image or none.
            os.replace(squashfs, images_dir / "layers" / f"{digest}.squashfs")
            new = work / "image"
            new.mkdir()
            (new / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            (new / "id").write_text(images.image_id(manifest) + "\n")
            (new / "key").write_text(key + "\n")
            if image_dir.exists():
                image_dir.rename(work / "old")
            new.rename(image_dir)
    return image_dir / "manifest.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flynn_host.dev.busybox", description="build the busybox test image"
    )
    parser.add_argument("--dir", required=True, type=Path, help="images directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--busybox", type=Path, default=BUSYBOX, help="static busybox binary")
    args = parser.parse_args(argv)
    try:
        path = build_busybox_image(args.dir, force=args.force, busybox=args.busybox)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
