"""Replacing a file so that readers see either the old content or the whole new one: the state
file, indexes, address allocations, the shim's exit record. The new content goes to a hidden
temporary file beside the target (same file system), which is then renamed over it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(
    path: str | Path, data: bytes | str, fsync: bool = True, mode: int | None = None
) -> None:
    """Replace `path` with `data`. With `fsync` the data is on disk before the rename, so a
    crash leaves the old file or the new one, never an empty one. `mode` sets permissions;
    the file has them before any data is written, so a private file (0600) is never readable
    by others, not even for a moment."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o666 if mode is None else mode)  # fmt: skip
        with open(fd, "wb") as f:
            if mode is not None:
                # exactly `mode`, whatever the umask, and also for a stale temporary file
                # that an interrupted writer left with other permissions
                os.fchmod(fd, mode)
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(
    path: str | Path,
    obj: Any,
    fsync: bool = True,
    indent: int | None = None,
    mode: int | None = None,
) -> None:
    """`write_atomic` of `obj` as JSON (with a final newline when indented)."""
    text = json.dumps(obj, indent=indent) + ("\n" if indent else "")
    write_atomic(path, text, fsync=fsync, mode=mode)
