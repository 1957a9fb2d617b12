-- One row per blob: its name (the URL path) and the large object holding its bytes. A PUT
-- writes a new large object and swaps the row in the same transaction, so a reader sees the
-- old blob or the new one, never part of one.
CREATE TABLE files (
    name         text PRIMARY KEY,
    oid          oid NOT NULL,
    size         bigint NOT NULL,
    etag         text NOT NULL,
    content_type text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
