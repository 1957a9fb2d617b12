"""What the blobstore's tests share: a running blobstore and a look at its storage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev.blobstore import BlobstoreProcess
from flynn_host.dev.controller import PGServer


@dataclass
class Blobstore:
    """A running blobstore and a look at its storage behind its back."""

    backend: str  # "postgres" or "dir"
    process: BlobstoreProcess
    pg: PGServer | None = None
    database: str = ""
    directory: Path | None = None

    @property
    def url(self) -> str:
        return self.process.url

    def sql(self, query: str) -> str:
        assert self.pg is not None
        return self.pg.psql(query, self.database).strip()

    def leftovers(self) -> list[str]:
        """What storage holds beyond the blobs: large objects no row points at, or files in
        the directory store's temporary directory."""
        if self.backend == "postgres":
            out = self.sql(
                "SELECT oid FROM pg_largeobject_metadata"
                " WHERE oid NOT IN (SELECT oid FROM files) ORDER BY oid"
            )
            return out.split()
        assert self.directory is not None
        return sorted(p.name for p in (self.directory / ".blobstore-tmp").iterdir())

    def large_objects(self) -> int:
        return int(self.sql("SELECT count(*) FROM pg_largeobject_metadata"))
