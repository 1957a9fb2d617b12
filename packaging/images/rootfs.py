"""Root filesystems and layers for Flynn images: mmdebstrap makes a base image's tree; a child
image's layer is the upper directory of an overlayfs over its parent's squashfs layers, in which
apt installs the child's packages, so the layer holds exactly the difference (new and changed
files, whiteouts for deletions, opaque directories for replaced ones). `make_layer` packs a tree
as squashfs keeping owners, modes and xattrs (the overlay's `trusted.overlay.opaque` included).

Everything runs as root inside a private mount namespace (`enter_private_mount_namespace`):
mounts are unmounted explicitly, and if the builder dies anyway (SIGKILL) the kernel drops the
namespace with every mount in it, and the loop devices clear themselves with their mounts.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flynn_host.runtime.images import DEFAULT_PATH

CLONE_NEWNS = 0x00020000
POLICY_RC_D = "#!/bin/sh\n# Flynn image build: no daemon starts in the build chroot.\nexit 101\n"
# Removed from every tree before it is packed: logs, caches and backups that differ per build.
CLEAN_GLOBS = (
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/lib/apt/lists/*_*",
    "var/lib/dbus/machine-id",
    "var/lib/dpkg/*-old",
    "tmp/*",
    "var/tmp/*",
    "root/.cache",
)
# Device nodes of the build chroot's /dev (a tmpfs): name, major, minor.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))  # fmt: skip


class BuildError(Exception):
    """A build step failed; the message says which and where its log is."""


def enter_private_mount_namespace() -> None:
    """Move this (single-threaded) process into a new mount namespace with private propagation,
    so its mounts are invisible to the host and die with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise BuildError(f"unshare(CLONE_NEWNS) failed: {os.strerror(err)}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


class Runner:
    """Runs build commands (argument lists, no shell), appending their output to one log, and
    reports build steps through `say`."""

    def __init__(self, log: Path, say: Callable[[str], None] = print) -> None:
        self.log = log
        self.say = say

    def step(self, message: str) -> None:
        self.say(message)
        with open(self.log, "a") as log:
            log.write(f"\n### {message}\n")

    def run(self, *argv: str, env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
            log.write(f"\n$ {shlex.join(argv)}\n".encode())
            log.flush()
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
        if result.returncode != 0:
            raise BuildError(
                f"{shlex.join(argv[:4])}{' ...' if len(argv) > 4 else ''} failed with exit "
                f"status {result.returncode}; the end of {self.log}:\n{self.tail()}"
            )

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def kill_processes_in(root: Path) -> None:
    """SIGKILL every process whose root directory is in `root` (a daemon a maintainer script
    started despite policy-rc.d, or gpg-agent), so the chroot's mounts can go."""
    prefix = str(root.resolve())
    victims = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            proc_root = os.readlink(entry / "root")
        except OSError:
            continue
        if proc_root == prefix or proc_root.startswith(prefix + "/"):
            victims.append(int(entry.name))
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while victims and time.monotonic() < deadline:
        victims = [pid for pid in victims if Path(f"/proc/{pid}").exists()]
        time.sleep(0.05)


class Mounts:
    """The mounts of one build, unmounted in reverse order, whatever happened; a mount point
    that stays busy is detached lazily as a last resort."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.points: list[Path] = []

    def mount(self, *args: str, target: Path) -> None:
        self.runner.run("mount", *args, str(target))
        self.points.append(target)

    def unmount_all(self, keep: int = 0) -> None:
        """Unmount everything mounted after the first `keep` mounts."""
        errors = []
        while len(self.points) > keep:
            point = self.points.pop()
            for argv in (["umount", "-d", str(point)], ["umount", "-d", "-l", str(point)]):
                result = subprocess.run(argv, capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                errors.append(f"{point}: {result.stderr.strip()}")
        if errors:
            raise BuildError("could not unmount " + "; ".join(errors))


def remove_tree(path: Path) -> None:
    """rmtree that refuses to descend into anything still mounted (a bind of a host file)."""
    if mounted_under(path):
        raise BuildError(f"not removing {path}: still mounted: {', '.join(mounted_under(path))}")
    shutil.rmtree(path, ignore_errors=True)


# --- the build chroot -------------------------------------------------------------------------


def apt_env(source_date_epoch: int) -> dict[str, str]:
    return {
        "PATH": DEFAULT_PATH,
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "DEBCONF_NONINTERACTIVE_SEEN": "true",
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
    }


@contextmanager
def chroot_mounts(root: Path, work: Path, apt_cache: Path, mounts: Mounts) -> Iterator[None]:
    """What apt and maintainer scripts need inside `root`: /proc, a read-only /sys, a small
    /dev, a private /tmp, the host's resolv.conf, and apt's lists and package cache kept
    outside the tree (so no download lands in the layer). A policy-rc.d keeps daemons
    stopped. Processes left in the chroot are killed on the way out; `mounts` unmounts."""
    start = len(mounts.points)
    mounts.mount("-t", "proc", "proc", target=root / "proc")
    mounts.mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", target=root / "sys")
    mounts.mount("-t", "tmpfs", "-o", "mode=755,nosuid,size=1m", "dev", target=root / "dev")
    for name, major, minor in DEVICES:
        os.mknod(root / "dev" / name, 0o20666, os.makedev(major, minor))
        os.chmod(root / "dev" / name, 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):  # fmt: skip
        (root / "dev" / name).symlink_to(target)
    (root / "dev/pts").mkdir()
    (root / "dev/shm").mkdir()
    mounts.mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620", "devpts",
                 target=root / "dev/pts")  # fmt: skip
    mounts.mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmp", target=root / "tmp")
    resolv = root / "etc/resolv.conf"
    if not resolv.exists() or resolv.is_symlink():
        raise BuildError(f"{resolv} must be a file (the base image provides an empty one)")
    mounts.mount("--bind", "/etc/resolv.conf", target=resolv)
    # apt's lists live with the build, downloaded packages in the --cache directory
    lists = work / "apt-lists"
    for d in (lists / "partial", apt_cache / "archives/partial"):
        d.mkdir(parents=True, exist_ok=True)
    mounts.mount("--bind", str(lists), target=root / "var/lib/apt/lists")
    mounts.mount("--bind", str(apt_cache), target=root / "var/cache/apt")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D)
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)
        kill_processes_in(root)
        mounts.unmount_all(keep=start)


def chroot_run(runner: Runner, root: Path, argv: list[str], source_date_epoch: int) -> None:
    runner.run("chroot", str(root), *argv, env=apt_env(source_date_epoch))


def apt_install(runner: Runner, root: Path, packages: list[str], source_date_epoch: int) -> None:
    opts = ["-q", "-o", "Dpkg::Use-Pty=0", "-o", "APT::Keep-Downloaded-Packages=true"]
    runner.step("apt-get update")
    chroot_run(runner, root, ["apt-get", *opts, "update"], source_date_epoch)
    runner.step(f"apt-get install ({len(packages)} packages and their dependencies)")
    chroot_run(runner, root, ["apt-get", *opts, "install", "-y", "--no-install-recommends",
                              *packages], source_date_epoch)  # fmt: skip


def copied_files(src: Path) -> Iterator[Path]:
    """The regular files `copy_tree` copies from `src`: no dot-files, caches or tests."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "tests")
        ]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                yield path


def copy_tree(src: Path, dest: Path) -> None:
    """Copy `src`'s files (see `copied_files`) under `dest`, owned by root, mode 0755 for
    executables and directories, 0644 for the rest."""
    for path in copied_files(src):
        target = dest / path.relative_to(src)
        old = os.umask(0o022)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
        shutil.copyfile(path, target)
        os.chown(target, 0, 0)
        target.chmod(0o755 if os.access(path, os.X_OK) else 0o644)


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write a recipe's files (absolute paths inside the image), mode 0644, parents 0755.
    Never through a symlink: an image's absolute symlink would lead out to the build host."""
    for name, text in sorted(files.items()):
        path = root / name.lstrip("/")
        for parent in [*reversed(path.relative_to(root).parents), path.relative_to(root)]:
            if (root / parent).is_symlink():
                raise BuildError(f"file {name}: {'/' + str(parent)} is a symlink in the image")
        for parent in reversed(path.relative_to(root).parents):
            d = root / parent
            if not d.exists():
                d.mkdir()
                d.chmod(0o755)
        path.write_text(text)
        path.chmod(0o644)


def clean(root: Path) -> None:
    """Remove logs, caches and backups that differ from build to build. In a child build this
    runs in the overlay, so a file inherited from the parent becomes a whiteout."""
    for pattern in CLEAN_GLOBS:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for dirpath, _dirs, files in os.walk(root / "var/log"):
        for name in files:
            os.unlink(os.path.join(dirpath, name))


def finish_tree(root: Path, source_date_epoch: int, overlay_upper: bool) -> None:
    """Make a tree reproducible before it is packed: clamp every mtime to SOURCE_DATE_EPOCH
    (older ones stay, so Python's .pyc files still match their sources) and, in an overlay's
    upper directory, drop the overlay's bookkeeping xattrs (origin, impure) except
    `trusted.overlay.opaque`, which the layer needs."""
    limit = source_date_epoch * 1_000_000_000

    def fix(path: str) -> None:
        if overlay_upper:
            for attr in os.listxattr(path, follow_symlinks=False):
                if attr.startswith("trusted.overlay.") and attr != "trusted.overlay.opaque":
                    os.removexattr(path, attr, follow_symlinks=False)
        if os.lstat(path).st_mtime_ns > limit:
            os.utime(path, ns=(limit, limit), follow_symlinks=False)

    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            fix(os.path.join(dirpath, name))
    fix(str(root))


def make_layer(runner: Runner, tree: Path, out: Path) -> None:
    """Pack `tree` as a squashfs layer. Unlike flynn_host.runtime.images.make_squashfs (right for
    the busybox image) this keeps owners (postgres, etcd, _apt own files), xattrs (file
    capabilities, overlay opaque directories) and the clamped mtimes."""
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    runner.run("mksquashfs", str(tree), str(out), "-noappend", "-no-progress", "-comp", "gzip",
               "-xattrs", "-mkfs-time", "0", env=env)  # fmt: skip


# --- the two kinds of build -------------------------------------------------------------------


def build_base_tree(
    runner: Runner, work: Path, recipe: dict, apt_cache: Path, source_date_epoch: int,
    mounts: Mounts,
) -> Path:  # fmt: skip
    """mmdebstrap the base image (the recipe's files written first, so packages see them), run
    the recipe's commands and clean it; return the tree. Its few dozen packages are quickly
    downloaded, so mmdebstrap uses no package cache."""
    work.chmod(0o755)  # apt's _apt user must reach the lists below it
    root = work / "rootfs"
    root.mkdir()
    root.chmod(0o755)
    write_files(root, recipe.get("files") or {})
    argv = ["mmdebstrap", "--mode=root", f"--variant={recipe.get('variant') or 'minbase'}",
            "--skip=check/empty"]  # fmt: skip
    if recipe.get("packages"):
        argv.append("--include=" + ",".join(recipe["packages"]))
    argv += [f"--dpkgopt={opt}" for opt in recipe.get("dpkg_options") or []]
    argv += [recipe["suite"], str(root), *(recipe.get("mirrors") or [])]
    runner.step(
        f"mmdebstrap {recipe['suite']} ({len(recipe.get('packages') or [])} packages included)"
    )
    runner.run(*argv, env={**os.environ, **apt_env(source_date_epoch)})
    # mmdebstrap copies the build machine's resolv.conf and hostname: not the image's business
    for name, text in (("resolv.conf", ""), ("hostname", "localhost\n")):
        (root / "etc" / name).write_text(text)
        (root / "etc" / name).chmod(0o644)
    if recipe.get("run"):
        runner.step(f"running {len(recipe['run'])} commands")
        with chroot_mounts(root, work, apt_cache, mounts):
            for command in recipe["run"]:
                chroot_run(runner, root, command, source_date_epoch)
    runner.step("cleaning logs and caches")
    clean(root)
    return root


def build_child_tree(
    runner: Runner,
    work: Path,
    parent_layers: list[Path],
    recipe: dict,
    apt_cache: Path,
    source_date_epoch: int,
    mounts: Mounts,
    source_root: Path | None = None,
) -> Path:
    """Install the recipe's packages in an overlayfs over the parent's layers (bottom first),
    then copy in its `copy` trees (from `source_root`); return the upper directory, which is
    the new layer's tree."""
    lowers = []
    for i, layer in enumerate(parent_layers):
        point = work / "lower" / str(i)
        point.mkdir(parents=True)
        mounts.mount("-t", "squashfs", "-o", "loop,ro", str(layer), target=point)
        lowers.append(point)
    upper, overlay_work, merged = work / "upper", work / "overlay-work", work / "merged"
    for d in (upper, overlay_work, merged):
        d.mkdir()
    upper.chmod(0o755)
    # full copy-ups only: a metacopy or redirect would point into layers the image won't have
    options = (
        f"lowerdir={':'.join(str(p) for p in reversed(lowers))},upperdir={upper},"
        f"workdir={overlay_work},index=off,metacopy=off,redirect_dir=off"
    )
    runner.step(f"overlayfs over {len(lowers)} parent layer(s)")
    mounts.mount("-t", "overlay", "-o", options, "overlay", target=merged)
    write_files(merged, recipe.get("files") or {})
    if recipe.get("packages") or recipe.get("run"):
        with chroot_mounts(merged, work, apt_cache, mounts):
            if recipe.get("packages"):
                apt_install(runner, merged, recipe["packages"], source_date_epoch)
            if recipe.get("run"):
                runner.step(f"running {len(recipe['run'])} commands")
            for argv in recipe.get("run") or []:
                chroot_run(runner, merged, argv, source_date_epoch)
    for dest, src in (recipe.get("copy") or {}).items():
        if source_root is None:
            raise BuildError("a recipe with 'copy' needs the repository's root")
        runner.step(f"copying {src} to {dest}")
        copy_tree(source_root / src, merged / dest.lstrip("/"))
    runner.step("cleaning logs and caches")
    clean(merged)
    mounts.unmount_all()
    return upper
