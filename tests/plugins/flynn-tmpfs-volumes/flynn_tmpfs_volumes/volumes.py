"""Data volumes as tmpfs mounts: flynn-host's `VolumeManager` (`create`, `list`, `get`,
`path`, `delete`, its index and errors) with its storage steps replaced, so each volume is
`mount -t tmpfs` at `<volpath>/tmpfs/<id>`: its data lives in memory, capped at 64 MiB.

The index `<volpath>/tmpfs-volumes.json` outlives the mounts: `open()` mounts every recorded
volume that is not mounted yet (empty after a clean stop or a reboot; still full after a
`SIGQUIT` restart, which leaves mounts in place for the jobs that keep running), and
`close()` unmounts them all. The plugin's service calls the two, so the daemon never leaves a
tmpfs mount behind when it stops.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from flynn_host.runtime.volumes import VolumeManager

MOUNT_OPTIONS = "size=64m,mode=0755"


def mounted_paths() -> set[str]:
    """Mount points of this mount namespace (octal escapes such as `\\040` decoded)."""
    with open("/proc/self/mounts") as f:
        return {
            re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
            for line in f
        }


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise OSError(f"{' '.join(args)}: {detail}")


class TmpfsVolumes(VolumeManager):
    """flynn-host's `VolumeManager` (index, ids, validation, errors) with tmpfs storage."""

    def __init__(self, volpath: Path, options: str = MOUNT_OPTIONS) -> None:
        super().__init__(volpath, data_dir="tmpfs", index="tmpfs-volumes.json")
        self.root = self.data_dir
        self.options = options

    # --- lifecycle (called by the plugin's service) ---------------------------------------------
    def open(self) -> None:
        """Mount every recorded volume that is not mounted (a new, empty tmpfs)."""
        for info in self.list():
            self.provision(self.path(info["id"]))

    def close(self, keep_mounts: bool = False) -> None:
        """Unmount every tmpfs under our root and remove its directory; with `keep_mounts`
        (the daemon leaves its jobs running for the next one), touch nothing."""
        if keep_mounts:
            return
        errors = []
        for path in sorted(p for p in mounted_paths() if Path(p).parent == self.root):
            try:
                self.remove_data(Path(path))
            except OSError as exc:
                errors.append(str(exc))
        mounted = mounted_paths()
        for d in self.root.iterdir():
            if str(d) not in mounted:
                shutil.rmtree(d, ignore_errors=True)
        if errors:
            raise OSError("; ".join(errors))

    # --- storage: a tmpfs per volume --------------------------------------------------------------
    def provision(self, path: Path) -> None:
        if str(path) in mounted_paths():
            return
        path.mkdir(exist_ok=True)
        try:
            _run("mount", "-t", "tmpfs", "-o", self.options, "tmpfs", str(path))
        except OSError:
            path.rmdir()
            raise

    def remove_data(self, path: Path) -> None:
        if str(path) in mounted_paths():
            try:
                _run("umount", str(path))
            except OSError:
                # busy (a job still has it open): detach it now, the kernel frees it later
                _run("umount", "-l", str(path))
        shutil.rmtree(path, ignore_errors=True)
