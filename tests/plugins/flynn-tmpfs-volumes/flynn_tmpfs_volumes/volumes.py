"""Data volumes as tmpfs mounts: the same interface as flynn-host's `VolumeManager`
(`create`, `list`, `get`, `path`, `delete`), but each volume is `mount -t tmpfs` at
`<volpath>/tmpfs/<id>`, so its data lives in memory and is capped at 64 MiB.

The index `<volpath>/tmpfs-volumes.json` outlives the mounts: `open()` mounts every recorded
volume that is not mounted yet (empty after a clean stop or a reboot; still full after a
`SIGQUIT` restart, which leaves mounts in place for the jobs that keep running), and
`close()` unmounts them all. The plugin's service calls the two, so the daemon never leaves a
tmpfs mount behind when it stops.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flynn_host.errors import FlynnError, ValidationError

VOLUME_ID_RE = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")
MOUNT_OPTIONS = "size=64m,mode=0755"


def mounted_paths() -> set[str]:
    """Mount points of this mount namespace (octal escapes such as `\\040` decoded)."""
    with open("/proc/self/mounts") as f:
        return {
            re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
            for line in f
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise OSError(f"{' '.join(args)}: {detail}")


class TmpfsVolumes:
    """Create, list, inspect and delete tmpfs data volumes under `volpath`."""

    def __init__(self, volpath: Path, options: str = MOUNT_OPTIONS) -> None:
        self.root = Path(volpath) / "tmpfs"
        self.index = Path(volpath) / "tmpfs-volumes.json"
        self.options = options
        self.root.mkdir(parents=True, exist_ok=True)
        self._volumes: dict[str, dict[str, Any]] = {}
        if self.index.exists():
            try:
                volumes = json.loads(self.index.read_text())["volumes"]
                self._volumes = {info["id"]: info for info in volumes}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.index}: not a tmpfs volume index: {e}") from None

    # --- lifecycle (called by the plugin's service) ---------------------------------------------
    def open(self) -> None:
        """Mount every recorded volume that is not mounted (a new, empty tmpfs)."""
        mounted = mounted_paths()
        for volume_id in self._volumes:
            if str(self._dir(volume_id)) not in mounted:
                self._mount(volume_id)

    def close(self, keep_mounts: bool = False) -> None:
        """Unmount every tmpfs under our root and remove its directory; with `keep_mounts`
        (the daemon leaves its jobs running for the next one), touch nothing."""
        if keep_mounts:
            return
        errors = []
        for path in sorted(p for p in mounted_paths() if Path(p).parent == self.root):
            try:
                self._unmount(Path(path))
            except OSError as exc:
                errors.append(str(exc))
        mounted = mounted_paths()
        for d in self.root.iterdir():
            if str(d) not in mounted:
                shutil.rmtree(d, ignore_errors=True)
        if errors:
            raise OSError("; ".join(errors))

    # --- the VolumeManager interface ----------------------------------------------------------
    def create(self, meta: dict[str, str] | None = None, volume_id: str | None = None) -> dict:
        """Create a volume (a new UUID unless `volume_id` is given), mount it, return its info."""
        if volume_id is None:
            volume_id = str(uuid.uuid4())
        elif not isinstance(volume_id, str) or not VOLUME_ID_RE.fullmatch(volume_id):
            raise ValidationError("id", "must be 1-128 letters, digits, '-', '_' or '.'")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise ValidationError("meta", "must be an object of strings")
        if volume_id in self._volumes:
            raise FlynnError("object_exists", f"volume {volume_id} already exists")
        info = {"id": volume_id, "type": "data", "meta": dict(meta), "created_at": _now()}
        # mounted before recorded, unrecorded before unmounted: a record always has its mount
        self._mount(volume_id)
        self._volumes[volume_id] = info
        try:
            self._save()
        except BaseException:
            del self._volumes[volume_id]
            self._unmount(self._dir(volume_id))
            raise
        return dict(info)

    def list(self) -> list[dict[str, Any]]:
        """All volumes, oldest first."""
        return [dict(info) for info in self._volumes.values()]

    def get(self, volume_id: str) -> dict[str, Any]:
        return dict(self._info(volume_id))

    def path(self, volume_id: str) -> Path:
        """The mount point of an existing volume (bind-mount it into a job)."""
        self._info(volume_id)
        return self._dir(volume_id)

    def delete(self, volume_id: str) -> None:
        """Forget the volume, unmount it (its data is gone) and remove its mount point."""
        info = self._info(volume_id)
        del self._volumes[volume_id]
        try:
            self._save()
        except BaseException:
            self._volumes[volume_id] = info
            raise
        self._unmount(self._dir(volume_id))

    # --- helpers ------------------------------------------------------------------------------
    def _dir(self, volume_id: str) -> Path:
        return self.root / volume_id

    def _info(self, volume_id: str) -> dict[str, Any]:
        info = self._volumes.get(volume_id)
        if info is None:
            raise FlynnError("not_found", f"volume {volume_id} not found")
        return info

    def _mount(self, volume_id: str) -> None:
        d = self._dir(volume_id)
        d.mkdir(exist_ok=True)
        try:
            _run("mount", "-t", "tmpfs", "-o", self.options, "tmpfs", str(d))
        except OSError:
            d.rmdir()
            raise

    def _unmount(self, path: Path) -> None:
        if str(path) in mounted_paths():
            try:
                _run("umount", str(path))
            except OSError:
                # busy (a job still has it open): detach it now, the kernel frees it later
                _run("umount", "-l", str(path))
        shutil.rmtree(path, ignore_errors=True)

    def _save(self) -> None:
        tmp = self.index.with_name(f".{self.index.name}.tmp")
        with open(tmp, "w") as f:
            json.dump({"volumes": list(self._volumes.values())}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.index)
