"""Finding, rendering and parsing a bootstrap manifest.

The manifest is `/etc/flynn/bootstrap-manifest.json` when it exists, else the one shipped with
flynn-host (`packaging/bootstrap-manifest.json` in the source tree; beside the executable, or
in the PyInstaller bundle, when frozen). `-` reads it from standard input, as Flynn does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from flynn_host.bootstrap.template import TemplateError, render

DEFAULT_MANIFEST = Path("/etc/flynn/bootstrap-manifest.json")
MANIFEST_NAME = "bootstrap-manifest.json"


class ManifestError(ValueError):
    pass


def packaged_manifest() -> Path:
    """The Layer 0 manifest that ships with flynn-host."""
    if getattr(sys, "frozen", False):
        for base in (getattr(sys, "_MEIPASS", None), Path(sys.executable).resolve().parent):
            if base and (Path(base) / MANIFEST_NAME).exists():
                return Path(base) / MANIFEST_NAME
    return Path(__file__).resolve().parents[2] / "packaging" / MANIFEST_NAME


def manifest_path(name: str | None) -> Path | None:
    """The manifest to read: `name`, else the installed one, else the packaged one.

    None means standard input (`-`)."""
    if name == "-":
        return None
    if name:
        return Path(name)
    return DEFAULT_MANIFEST if DEFAULT_MANIFEST.exists() else packaged_manifest()


def read_manifest(name: str | None) -> tuple[str, str]:
    """(text, where) of the manifest; ManifestError if it cannot be read."""
    path = manifest_path(name)
    if path is None:
        return sys.stdin.read(), "<stdin>"
    try:
        return path.read_text(), str(path)
    except OSError as exc:
        raise ManifestError(f"error reading manifest {path}: {exc.strerror or exc}") from None


def parse_manifest(text: str, where: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Render the template, parse the JSON and check every step has an `id` and an `action`."""
    try:
        rendered = render(text, data)
    except TemplateError as exc:
        raise ManifestError(f"manifest {where}: template error: {exc}") from None
    try:
        steps = json.loads(rendered)
    except json.JSONDecodeError as exc:
        lines = rendered.splitlines()
        context = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else ""
        raise ManifestError(
            f"manifest {where}: invalid JSON after rendering the template: {exc.msg} at line "
            f"{exc.lineno}, column {exc.colno}:\n{context}\n{' ' * (exc.colno - 1)}^"
        ) from None
    if not isinstance(steps, list):
        raise ManifestError(f"manifest {where}: expected a JSON list of steps")
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise ManifestError(f"manifest {where}: step {i} is not a JSON object")
        for key in ("id", "action"):
            if not isinstance(step.get(key), str) or not step[key]:
                raise ManifestError(f"manifest {where}: step {i} has no {key!r}")
        if step["id"] in seen:
            raise ManifestError(f"manifest {where}: duplicate step id {step['id']!r}")
        seen.add(step["id"])
    return steps
