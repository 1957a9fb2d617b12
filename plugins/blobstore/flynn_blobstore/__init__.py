"""The blobstore: files over HTTP (PUT, GET with ranges, HEAD, DELETE) kept in PostgreSQL large
objects or in a directory; where slugs, build caches and git repositories live. See
docs/blobstore.md."""
