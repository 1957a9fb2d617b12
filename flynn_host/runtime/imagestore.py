"""Images a host has imported: Flynn image manifests by name, their layers in the host's
layer cache, and garbage collection of cached layers nothing uses any more.

Importing fetches every layer of a manifest (a path, a `file://` or an `http(s)://` URL) into
the `LayerStore`'s cache, checking each against its size and sha512_256, and records the
image under a name. An image's layers are found beside its manifest, in the layout `make
images` writes and any static file server can serve: `<dir>/<name>/manifest.json` and
`<dir>/layers/<layer id>.squashfs`. A job then names the image's layers by their cache files,
so starting it needs nothing but the host.

A manifest is read with the caps of `flynn_host.limits` (size, time, JSON nesting) and a
`file://` one only from under the image directories, as layers are.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import aiohttp

from flynn_host import discoverd_resolver, limits
from flynn_host.atomicfile import write_json_atomic
from flynn_host.errors import FlynnError, ValidationError, not_found
from flynn_host.runtime import images
from flynn_host.runtime.layers import LayerError, LayerStore
from flynn_host.types import MountSpec, now

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def _manifest_url(ref: str) -> str:
    if re.match(r"^(file|https?)://", ref):
        return ref
    return Path(ref).absolute().as_uri()


def default_name(url: str) -> str:
    """`.../base/manifest.json` is called `base`."""
    parts = [p for p in urlparse(url).path.split("/") if p]
    return parts[-2] if len(parts) >= 2 else "image"


class ImageStore:
    def __init__(self, volpath: Path, layers: LayerStore) -> None:
        self.index = Path(volpath) / "images.json"
        self.layers = layers
        self._images: dict[str, dict[str, Any]] = {}
        if self.index.exists():
            self._images = json.loads(self.index.read_text())["images"]

    def _save(self) -> None:
        write_json_atomic(self.index, {"images": self._images}, fsync=False, indent=2)

    async def _read_manifest(self, url: str) -> dict[str, Any]:
        what = f"image manifest {url}"
        try:
            if urlparse(url).scheme == "file":
                path = limits.file_url_path(url)
                data = await asyncio.to_thread(
                    limits.read_image_file,
                    path,
                    self.layers.image_dirs,
                    limits.MAX_MANIFEST,
                    what,
                )
            else:
                async with (
                    asyncio.timeout(limits.MANIFEST_TIMEOUT),
                    aiohttp.ClientSession(
                        connector=discoverd_resolver.connector(self.layers.resolver)
                    ) as session,
                    session.get(url) as resp,
                ):
                    if resp.status != 200:
                        raise FlynnError("not_found", f"{what}: HTTP {resp.status}")
                    if (resp.content_length or 0) > limits.MAX_MANIFEST:
                        raise limits.TooBig(what, limits.MAX_MANIFEST)
                    data = await limits.read_stream(resp.content, limits.MAX_MANIFEST, what)
        except (limits.TooBig, limits.FileRefused) as exc:
            raise ValidationError("manifest_url", str(exc)) from exc
        except TimeoutError as exc:
            raise FlynnError(
                "not_found", f"{what}: no answer within {limits.MANIFEST_TIMEOUT:g} seconds"
            ) from exc
        except (OSError, aiohttp.ClientError, ValueError) as exc:  # ValueError: a bad URL
            raise FlynnError("not_found", f"{what}: {exc}") from exc
        try:
            manifest = limits.loads_json(data)
        except ValueError as exc:
            raise ValidationError("manifest", f"is not JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("_type") != images.MANIFEST_TYPE:
            raise ValidationError("manifest", f"is not a Flynn image manifest ({url})")
        return manifest

    async def import_image(self, ref: str, name: str | None = None) -> dict[str, Any]:
        """Fetch and verify every layer of the manifest at `ref`, then record the image."""
        url = _manifest_url(ref)
        name = name or default_name(url)
        if not NAME_RE.fullmatch(name):
            raise ValidationError("name", "must be 1-64 lower-case letters, digits, '.', '_', '-'")
        manifest = await self._read_manifest(url)
        template = urljoin(url, "../layers/") + "{id}.squashfs"
        try:
            raw_specs = images.mountspecs_for(manifest, template)
            image_id = images.image_id(manifest)
        except (ValueError, TypeError) as exc:  # TypeError: what canonical JSON cannot encode
            raise ValidationError("manifest", str(exc)) from exc
        if len(raw_specs) > limits.MAX_LAYERS:
            raise ValidationError("manifest", f"has more than {limits.MAX_LAYERS} layers")
        specs = [MountSpec.from_json(s, f"layers[{i}]") for i, s in enumerate(raw_specs)]
        for spec in specs:
            try:
                await self.layers.fetch(spec)
            except LayerError as exc:
                raise FlynnError(
                    "validation_error", f"image {name}: {exc}", {"layer": spec.id}
                ) from exc
        self._images[name] = {
            "name": name,
            "id": image_id,
            "manifest": manifest,
            "source": url,
            "imported_at": now(),
        }
        self._save()
        return self.get(name)

    def get(self, name: str) -> dict[str, Any]:
        """The image record plus `mountspecs` naming the host's cached layers."""
        record = self._images.get(name)
        if record is None:
            raise not_found(f"image {name} not found")
        template = f"file://{self.layers.cache_dir}/{{id}}.squashfs"
        specs = images.mountspecs_for(record["manifest"], template)
        size = sum(s["size"] for s in specs)
        return {**record, "mountspecs": specs, "size": size}

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self._images):
            image = self.get(name)
            out.append({k: image[k] for k in ("name", "id", "source", "imported_at", "size")}
                       | {"layers": len(image["mountspecs"])})  # fmt: skip
        return out

    def delete(self, name: str) -> None:
        if name not in self._images:
            raise not_found(f"image {name} not found")
        del self._images[name]
        self._save()

    def layer_ids(self) -> set[str]:
        return {s["id"] for name in self._images for s in self.get(name)["mountspecs"]}

    def gc(self, in_use: set[str]) -> builtins.list[str]:  # `list` is a method here
        """Delete cached layers that no image and no job uses; return their ids."""
        keep = self.layer_ids() | in_use
        removed = []
        for path in sorted(self.layers.cache_dir.glob("*.squashfs")):
            layer_id = path.name.removesuffix(".squashfs")
            if layer_id not in keep:
                self.layers.remove(layer_id)
                removed.append(layer_id)
        return removed
