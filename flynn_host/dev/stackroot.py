"""Run a command in the `stack` image without a host daemon: for the buildpacks' tests and the
build benchmark, which need the stack's runtimes (Node.js, Go, Ruby, PHP, Java, ...) but not a
cluster.

Each run is its own `unshare --mount --pid` child: the stack's squashfs layers are loop-mounted
read-only and joined by an overlayfs with a throwaway upper directory, `/proc`, `/dev`, a
private `/tmp` and the machine's resolv.conf are mounted, the given host directories are bound
in, and the command runs chrooted as `nobody` (or `user`). Every mount lives in the child's
mount namespace and every process in its PID namespace, so when the child ends (or is killed)
the kernel takes all of it away; only the upper directory is removed by hand.

    with StackRoot() as root:
        root.run(["bin/compile", "/app", "/cache", "/env"], binds={src: "/app"}, check=True)
        server = root.popen(["bash", "-c", "cd /app && npm start"], env={"PORT": "15080"})
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flynn_host.runtime import images

NOBODY = 65534
# runs as root in the new namespaces; "$@" is the chrooted command
_SETUP = r"""
set -e
root=$FLYNN_STACKROOT
i=0
for layer in $FLYNN_STACKROOT_LAYERS; do
  mkdir -p "$root/lower/$i"
  mount -t squashfs -o loop,ro "$layer" "$root/lower/$i"
  lowers="$root/lower/$i${lowers:+:$lowers}"
  i=$((i + 1))
done
opts="lowerdir=$lowers,upperdir=$root/upper,workdir=$root/work"
mount -t overlay overlay -o "$opts" "$root/rootfs"
r=$root/rootfs
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
mount -t tmpfs -o mode=1777 tmp "$r/tmp"
mount --bind /etc/resolv.conf "$r/etc/resolv.conf"
printf '%s' "$FLYNN_STACKROOT_BINDS" | while IFS='|' read -r src dst mode; do
  [ -n "$src" ] || continue
  mkdir -p "$r$dst"
  mount --bind "$src" "$r$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$r$dst"; fi
done
unset FLYNN_STACKROOT FLYNN_STACKROOT_LAYERS FLYNN_STACKROOT_BINDS
# not exec: this shell stays PID 1, root, with --kill-child's death signal (setpriv's uid
# change clears it), so killing unshare takes the whole PID namespace down
chroot "$r" "$@"
"""


class StackRoot:
    """The `stack` image (from `$FLYNN_IMAGES` unless `images_dir` is given), ready to run
    commands in; use it as a context manager so its scratch directory is removed."""

    def __init__(self, image: str = "stack", images_dir: Path | None = None) -> None:
        directory = images_dir or images.images_dir()
        manifest, _ = images.load_manifest(image, directory)
        specs = images.mountspecs_for(manifest, images.local_layer_template(directory))
        self.layers = [s["url"].removeprefix("file://") for s in specs]
        self.entry_env = {str(k): str(v) for k, v in images.entrypoint(manifest)["env"].items()}
        self.scratch = Path(tempfile.mkdtemp(prefix="flynn-stackroot-"))

    def __enter__(self) -> StackRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _command(
        self,
        argv: Sequence[str],
        *,
        binds: Mapping[str | Path, str] | None,
        read_only: Sequence[str],
        env: Mapping[str, str] | None,
        user: int,
        cwd: str,
    ) -> tuple[list[str], dict[str, str]]:
        # each run gets a fresh upper directory: nothing one run writes outside its binds
        # is seen by the next
        run_dir = Path(tempfile.mkdtemp(dir=self.scratch))
        for sub in ("upper", "work", "rootfs"):
            (run_dir / sub).mkdir()
        lines = []
        for src, dst in (binds or {}).items():
            if "|" in f"{src}{dst}" or "\n" in f"{src}{dst}":
                raise ValueError(f"bind {src} -> {dst}: '|' and newlines are not allowed")
            lines.append(f"{src}|{dst}|{'ro' if dst in read_only else 'rw'}\n")
        job_env = {"HOME": "/app", **self.entry_env, **(env or {})}
        inner = [
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--clear-groups",
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in job_env.items()),
            "sh",
            "-c",
            'cd "$0" && exec "$@"',
            cwd,
            *argv,
        ]
        outer = ["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child"]
        outer += ["sh", "-c", _SETUP, "stackroot", *inner]
        setup_env = {
            "PATH": images.DEFAULT_PATH,
            "FLYNN_STACKROOT": str(run_dir),
            "FLYNN_STACKROOT_LAYERS": " ".join(self.layers),
            "FLYNN_STACKROOT_BINDS": "".join(lines),
        }
        return outer, setup_env

    def run(
        self,
        argv: Sequence[str],
        *,
        binds: Mapping[str | Path, str] | None = None,
        read_only: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        user: int = NOBODY,
        cwd: str = "/",
        timeout: float | None = 600,
        check: bool = False,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` to the end; stdout and stderr come back together as text."""
        cmd, setup_env = self._command(
            argv, binds=binds, read_only=read_only, env=env, user=user, cwd=cwd
        )
        result = subprocess.run(
            cmd,
            env=setup_env,
            input=input.decode() if input is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, list(argv), output=result.stdout)
        return result

    def popen(
        self,
        argv: Sequence[str],
        *,
        binds: Mapping[str | Path, str] | None = None,
        read_only: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        user: int = NOBODY,
        cwd: str = "/",
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` (e.g. an app's web process); kill the Popen to stop it and everything
        it started."""
        cmd, setup_env = self._command(
            argv, binds=binds, read_only=read_only, env=env, user=user, cwd=cwd
        )
        return subprocess.Popen(cmd, env=setup_env, **kwargs)


def writable_dir(parent: Path, name: str, uid: int = NOBODY) -> Path:
    """A directory under `parent` that the chrooted user may write."""
    path = parent / name
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path
