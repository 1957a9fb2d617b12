"""What the blobstore's server and its clients share: a blob's metadata and the names of
things."""

from __future__ import annotations

from dataclasses import dataclass

SERVICE = "blobstore"
DEFAULT_URL = "http://blobstore.discoverd"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# answers 200 while the server can reach its storage; not a blob name
STATUS_PATH = "/.well-known/status"


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its size in bytes, its ETag (hex SHA-256 of the bytes, unquoted) and the
    Content-Type it was stored with."""

    size: int
    etag: str
    content_type: str = DEFAULT_CONTENT_TYPE
