"""Flynn images: the image manifest, its canonical-JSON id, and squashfs layers.

A Flynn image (docs/host.md#image-manifests) is a manifest
`application/vnd.flynn.image.manifest.v1+json` listing entrypoints and, per platform, squashfs
layers named by their sha512_256. The image id is the sha512_256 of the manifest's canonical
JSON, so the same manifest has the same id everywhere.
Jobs do not see manifests: they get `mountspecs`, which `mountspecs_for` derives from one.

The small "busybox" test image is built by `flynn_host.dev.busybox`, a development tool.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from flynn_host import limits
from flynn_host.errors import not_found

# Where images are built and looked up by name: machine-wide, so every checkout (and CI's fresh
# clones) reuses one build; $FLYNN_IMAGES overrides it.
DEFAULT_IMAGES_DIR = Path("/var/lib/flynn/images")


def images_dir() -> Path:
    return Path(os.environ.get("FLYNN_IMAGES") or DEFAULT_IMAGES_DIR)


MANIFEST_TYPE = "application/vnd.flynn.image.manifest.v1+json"
LAYER_TYPE = "application/vnd.flynn.image.squashfs.v1"
PLATFORM = {"architecture": "amd64", "os": "linux"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# --- canonical JSON and ids -------------------------------------------------------------------


def _encode(obj: Any, out: list[str]) -> None:
    # go-tuf's canonical encoding: object keys sorted, no whitespace, strings escape only `"` and
    # `\` (control characters and non-ASCII are emitted raw), floats are refused.
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, str):
        out.append('"' + obj.replace("\\", "\\\\").replace('"', '\\"') + '"')
    elif isinstance(obj, dict):
        out.append("{")
        for i, key in enumerate(sorted(obj)):
            if not isinstance(key, str):
                raise TypeError(f"canonical JSON object keys must be strings, not {key!r}")
            if i:
                out.append(",")
            _encode(key, out)
            out.append(":")
            _encode(obj[key], out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif isinstance(obj, float):
        raise TypeError("canonical JSON cannot encode floats")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as canonical JSON")


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes of `obj` (sorted keys, no insignificant whitespace, UTF-8)."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out).encode()


def sha512_256(data: bytes = b"") -> Any:
    """A sha512/256 hash object (Flynn's layer and image hash)."""
    return hashlib.new("sha512_256", data)


def image_id(manifest: dict[str, Any]) -> str:
    """The image id: hex sha512_256 of the manifest's canonical JSON."""
    return sha512_256(canonical_json(manifest)).hexdigest()


def file_sha512_256(path: Path) -> str:
    h = sha512_256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- manifests --------------------------------------------------------------------------------


def _manifest_file(ref: str, images_dir: Path) -> tuple[Path, str]:
    """The manifest file `ref` names, and how to name it in a not-found message."""
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path)), "image manifest"
    if "://" in ref:
        raise ValueError(f"image reference {ref!r}: only file:// URLs are supported here")
    if "/" in ref or ref.endswith(".json"):
        return Path(ref), "image manifest"
    if not ref or ref.startswith("."):
        raise ValueError(f"invalid image name {ref!r}")
    return images_dir / ref / "manifest.json", f"image {ref!r}"


def load_manifest(ref: str, images_dir: Path) -> tuple[dict[str, Any], str]:
    """Load an image manifest from a path, a `file://` URL or a bare image name (resolved as
    `<images_dir>/<name>/manifest.json`). Return it and the `file://` URL of its directory
    (ending in `/`), against which relative layer URLs resolve."""
    path, what = _manifest_file(ref, images_dir)
    path = path.absolute()
    try:
        text = limits.read_capped_file(path, limits.MAX_MANIFEST, str(path))
    except FileNotFoundError:
        raise not_found(f"{what} not found: no {path}") from None
    try:
        manifest = limits.loads_json(text)
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("_type") != MANIFEST_TYPE:
        raise ValueError(f"{path}: not a Flynn image manifest (_type must be {MANIFEST_TYPE})")
    return manifest, f"file://{path.parent}/"


def entrypoint(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `_default` entrypoint (env, cwd, args, ...)."""
    ep = (manifest.get("entrypoints") or {}).get("_default")
    if not isinstance(ep, dict):
        raise ValueError("image manifest has no _default entrypoint")
    return ep


def mountspecs_for(manifest: dict[str, Any], layer_url_template: str) -> list[dict[str, Any]]:
    """Job mountspecs (Flynn's JSON) for the manifest's linux/amd64 layers, bottom layer first;
    each url is `layer_url_template` with `{id}` replaced by the layer id."""
    # a manifest may come from anywhere: each part's shape is checked before it is used
    all_rootfs = manifest.get("rootfs") or []
    if not isinstance(all_rootfs, list):
        raise ValueError("image manifest rootfs must be an array")
    for rootfs in all_rootfs:
        if isinstance(rootfs, dict) and rootfs.get("platform") == PLATFORM:
            break
    else:
        raise ValueError("image manifest has no rootfs for linux/amd64")
    layers = rootfs.get("layers") or []
    if not isinstance(layers, list):
        raise ValueError("image manifest layers must be an array")
    specs = []
    for i, layer in enumerate(layers):
        hashes = layer.get("hashes") if isinstance(layer, dict) else None
        digest = hashes.get("sha512_256") if isinstance(hashes, dict) else None
        if not digest or not layer.get("length"):
            raise ValueError(f"image manifest layer {i} has no sha512_256 hash or length")
        layer_id = layer.get("id") or digest
        specs.append(
            {
                "type": "squashfs",
                "id": layer_id,
                "url": layer_url_template.replace("{id}", layer_id),
                "size": layer["length"],
                "hashes": {"sha512_256": digest},
                "meta": layer.get("meta") or {},
            }
        )
    if not specs:
        raise ValueError("image manifest has no layers for linux/amd64")
    return specs


def local_layer_template(images_dir: Path) -> str:
    """Layer URL template for images built into `images_dir` (layers in `layers/`)."""
    return f"file://{images_dir.absolute()}/layers/{{id}}.squashfs"


# --- squashfs ---------------------------------------------------------------------------------


def make_squashfs(rootfs_dir: Path, out: Path) -> None:
    """Write `rootfs_dir` as a squashfs to `out`, byte-identical for identical input: owners,
    timestamps and xattrs are not taken from the build machine."""
    args = [
        "mksquashfs",
        str(rootfs_dir),
        str(out),
        "-noappend",
        "-quiet",
        "-no-progress",
        "-comp",
        "gzip",
        "-all-root",
        "-no-xattrs",
        "-mkfs-time",
        "0",
        "-all-time",
        "0",
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mksquashfs {rootfs_dir} failed: {result.stderr.strip()}")
