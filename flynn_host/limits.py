"""Caps on what the host reads from outside, and the one place that enforces them: request
bodies, JSON nesting, image manifests, HTTP responses, and the local files a `file://` URL may
name.

Whatever a client or a remote server sends is read with a size cap and a timeout, so that a
hostile or broken peer gets a clear 4xx instead of a daemon that grows until it is killed or a
handler that waits forever. JSON is parsed only after its nesting was counted, because Python's
parser recurses. A `file://` URL may name only a regular file under the image directories
(symlinks and `..` resolved first), not any file of the host: not `/etc/shadow` (whose size and
hash a layer fetch would leak), not `/dev/zero` (endless), not a FIFO (a read that blocks).
The values are documented in docs/host.md ("Limits").
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

MIB = 1024 * 1024
GIB = 1024 * MIB

# A JSON request body (jobs, attach, volumes, images, discoverd's API). Flynn's largest, a job
# with its env, is a few KiB; 1 MiB of JSON already parses into some 30 MB of Python objects.
MAX_JSON_BODY = 1 * MIB
# Nesting of any JSON the host parses. A job is about 5 deep; Python's parser recurses once per
# level and gives up near 1000, so 100,000 `[` would be a RecursionError, not a syntax error.
MAX_JSON_DEPTH = 64
# The whole request body must arrive within this: a client that stalls mid-body holds a handler.
BODY_TIMEOUT = 30.0
# An image manifest (a few KiB in practice), from a file or over HTTP, and how long the HTTP
# fetch may take in all.
MAX_MANIFEST = 1 * MIB
MANIFEST_TIMEOUT = 60.0
# A layer download that receives nothing for this long is abandoned (its size is capped by the
# mountspec's `size`, itself at most MAX_LAYER_SIZE).
LAYER_READ_TIMEOUT = 60.0
MAX_LAYER_SIZE = 16 * GIB
# Layers in a job or an image: overlayfs takes every lower layer in one mount option of at most
# a page (4 KiB), so a few dozen mount points is what the kernel accepts anyway.
MAX_LAYERS = 32

CHUNK = 1 << 16


class TooBig(ValueError):
    """More bytes than the cap allowed."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} is larger than {limit} bytes")
        self.limit = limit


class FileRefused(ValueError):
    """A local file a `file://` URL or path may not name (outside the image directories, not
    a regular file, not an absolute path)."""


# --- JSON -------------------------------------------------------------------------------------

# A JSON string (escapes included): brackets inside one do not nest.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_PARENS = bytes.maketrans(b"[{]}", b"(())")


def json_depth_over(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `data` nests deeper than `max_depth` (or would, before its syntax
    error shows). Linear-time C string work, no recursion: the brackets outside strings are
    kept, and each pass deletes every innermost `()` pair, which lowers the depth by one."""
    parens = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS).translate(_PARENS)
    passes = 0
    while passes <= max_depth:
        shorter = parens.replace(b"()", b"")
        if shorter == parens:
            break
        parens, passes = shorter, passes + 1
    # what is left is `)...)(...(`: unclosed openers nest on top of what the passes removed
    return passes + parens.count(b"(") > max_depth


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that came from outside. Raises ValueError (with the reason) for invalid
    UTF-8, invalid JSON, NaN/Infinity (Go's encoding/json refuses them too), nesting deeper
    than `max_depth` and numbers longer than Python converts (4300 digits)."""
    raw = data.encode() if isinstance(data, str) else data
    if json_depth_over(raw, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # not reached after the depth check; kept as a last guard
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None


# --- bounded reads ----------------------------------------------------------------------------


class _Stream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


async def read_stream(stream: _Stream, limit: int, what: str) -> bytes:
    """Everything up to EOF from an aiohttp stream (a request's or a response's `content`);
    TooBig past `limit` bytes, having read at most one chunk more. Callers bound the time
    with `asyncio.timeout`."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooBig(what, limit)
        chunks.append(chunk)
    return b"".join(chunks)


# --- local files ------------------------------------------------------------------------------


def file_url_path(url: str) -> Path:
    """The path of a `file://` URL (a plain path is taken as it is). Only local URLs:
    `file:///p` or `file://localhost/p`."""
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise FileRefused(f"{url}: a file:// URL must name a local path")
        url = unquote(parts.path)
    return Path(url)


def image_file(path: Path, image_dirs: Iterable[Path]) -> Path:
    """`path` with symlinks and `..` resolved, if it lies under one of `image_dirs` (resolved
    too); FileRefused otherwise. The file need not exist (reading it then fails as not found)."""
    dirs = list(image_dirs)
    if "\0" in str(path) or not path.is_absolute():
        raise FileRefused(f"{path!r} is not an absolute path")
    try:
        real = path.resolve()
        real_dirs = [d.resolve() for d in dirs]
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an unencodable name
        raise FileRefused(f"{path!r}: {exc}") from None
    if any(real.is_relative_to(d) for d in real_dirs):
        return real
    names = ", ".join(str(d) for d in dirs) or "none"
    raise FileRefused(f"{path} is not under the image directories ({names})")


def open_image_file(path: Path, image_dirs: Iterable[Path]) -> BinaryIO:
    """Open a file under the image directories for reading; FileRefused unless it is a regular
    file (FileNotFoundError if it does not exist)."""
    real = image_file(path, image_dirs)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: a symlink swapped in
    # after the check is not followed. Neither changes how a regular file reads.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image_file(path: Path, image_dirs: Iterable[Path], limit: int, what: str) -> bytes:
    """The bytes of a regular file under the image directories; TooBig past `limit`."""
    with open_image_file(path, image_dirs) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooBig(what, limit)
    return data


def read_capped_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of any file a user names (the CLI's own reads), at most `limit`."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooBig(what, limit)
    return data
