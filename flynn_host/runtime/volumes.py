"""Data volumes: directories that outlive jobs, for Flynn's `/storage/volumes` API.

A volume is `<volpath>/data/<id>/`, recorded in `<volpath>/volumes.json` as Flynn's `volume.Info`
(`{"id", "type": "data", "meta", "created_at"}`). The index is replaced atomically and the
directory is created before its record and deleted after it, so the only thing a crash can
leave behind is an unrecorded (empty or half-deleted) directory, never a record without data.
Whether a volume is in use by a job is the daemon's business, not this module's.

It is also the base of other volume providers: a plugin that keeps its volumes elsewhere
subclasses it and overrides `provision` and `remove_data` (see the tmpfs example plugin in
`tests/plugins/`), keeping the index, ids, validation and errors as they are here.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from flynn_host.atomicfile import write_json_atomic
from flynn_host.errors import FlynnError, ValidationError, not_found
from flynn_host.types import now

VOLUME_ID_RE = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")


class VolumeManager:
    """Create, list, inspect and delete data volumes under `volpath`."""

    def __init__(self, volpath: Path, data_dir: str = "data", index: str = "volumes.json") -> None:
        self.volpath = Path(volpath)
        self.data_dir = self.volpath / data_dir
        self.index = self.volpath / index
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._volumes: dict[str, dict[str, Any]] = {}
        if self.index.exists():
            try:
                volumes = json.loads(self.index.read_text())["volumes"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.index}: not a volume index: {e}") from None
            self._volumes = {info["id"]: info for info in volumes}

    def create(
        self, meta: dict[str, str] | None = None, volume_id: str | None = None
    ) -> dict[str, Any]:
        """Create a data volume (a new UUID unless `volume_id` is given) and return its info."""
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
        info = {"id": volume_id, "type": "data", "meta": dict(meta), "created_at": now()}
        # made before it is recorded, so a record always has its data
        self.provision(self._dir(volume_id))
        self._volumes[volume_id] = info
        try:
            self._save()
        except BaseException:
            del self._volumes[volume_id]
            self.remove_data(self._dir(volume_id))
            raise
        return dict(info)

    def list(self) -> list[dict[str, Any]]:
        """All volumes, oldest first."""
        return [dict(info) for info in self._volumes.values()]

    def get(self, volume_id: str) -> dict[str, Any]:
        return dict(self._info(volume_id))

    def path(self, volume_id: str) -> Path:
        """The directory of an existing volume (bind-mount it into a job)."""
        self._info(volume_id)
        return self._dir(volume_id)

    def delete(self, volume_id: str) -> None:
        """Forget the volume and delete its data. Blocks while deleting: call it in a thread
        for big volumes."""
        self._info(volume_id)
        info = self._volumes.pop(volume_id)
        try:
            self._save()
        except BaseException:
            self._volumes[volume_id] = info
            raise
        self.remove_data(self._dir(volume_id))

    # --- what a provider overrides --------------------------------------------------------
    def provision(self, path: Path) -> None:
        """Make the volume's storage at `path`. exist_ok: an unrecorded directory can only be
        left by a crash in create or delete."""
        path.mkdir(exist_ok=True)

    def remove_data(self, path: Path) -> None:
        """Delete the volume's storage at `path` (it is no longer recorded)."""
        shutil.rmtree(path, ignore_errors=True)

    # --- helpers ----------------------------------------------------------------------------
    def _dir(self, volume_id: str) -> Path:
        return self.data_dir / volume_id

    def _info(self, volume_id: str) -> dict[str, Any]:
        info = self._volumes.get(volume_id)
        if info is None:
            raise not_found(f"volume {volume_id} not found")
        return info

    def _save(self) -> None:
        write_json_atomic(self.index, {"volumes": list(self._volumes.values())}, indent=2)
