-- The controller's first schema: apps, artifacts, releases, formations, deployments,
-- providers, resources, routes, events, and the work queue of asynchronous tasks.
-- Deleted rows are kept with deleted_at set (Flynn soft-deletes), so events and deployments
-- can still name them.

CREATE TABLE apps (
    app_id          uuid PRIMARY KEY,
    name            text NOT NULL,
    meta            jsonb NOT NULL DEFAULT '{}',
    strategy        text NOT NULL DEFAULT 'all-at-once',
    release_id      uuid,
    deploy_timeout  integer NOT NULL DEFAULT 30,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE UNIQUE INDEX apps_name_idx ON apps (name) WHERE deleted_at IS NULL;

CREATE TABLE artifacts (
    artifact_id  uuid PRIMARY KEY,
    type         text NOT NULL,
    uri          text NOT NULL,
    meta         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE UNIQUE INDEX artifacts_type_uri_idx ON artifacts (type, uri) WHERE deleted_at IS NULL;

CREATE TABLE releases (
    release_id   uuid PRIMARY KEY,
    artifact_id  uuid REFERENCES artifacts (artifact_id),
    env          jsonb,
    meta         jsonb,
    processes    jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);

ALTER TABLE apps ADD FOREIGN KEY (release_id) REFERENCES releases (release_id);
-- the app a release was first deployed or scaled for: `GET /apps/:app/releases` lists it
ALTER TABLE releases ADD COLUMN app_id uuid REFERENCES apps (app_id);

CREATE TABLE formations (
    app_id      uuid NOT NULL REFERENCES apps (app_id),
    release_id  uuid NOT NULL REFERENCES releases (release_id),
    processes   jsonb,
    tags        jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz,
    PRIMARY KEY (app_id, release_id)
);

CREATE TABLE deployments (
    deployment_id   uuid PRIMARY KEY,
    app_id          uuid NOT NULL REFERENCES apps (app_id),
    old_release_id  uuid REFERENCES releases (release_id),
    new_release_id  uuid NOT NULL REFERENCES releases (release_id),
    strategy        text NOT NULL,
    status          text NOT NULL DEFAULT 'pending',
    processes       jsonb,
    deploy_timeout  integer NOT NULL DEFAULT 30,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
-- one deployment in progress per app
CREATE UNIQUE INDEX deployments_running_idx ON deployments (app_id) WHERE finished_at IS NULL;

CREATE TABLE providers (
    provider_id  uuid PRIMARY KEY,
    name         text NOT NULL,
    url          text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE UNIQUE INDEX providers_name_idx ON providers (name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX providers_url_idx ON providers (url) WHERE deleted_at IS NULL;

CREATE TABLE resources (
    resource_id  uuid PRIMARY KEY,
    provider_id  uuid NOT NULL REFERENCES providers (provider_id),
    external_id  text,
    env          jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);

CREATE TABLE app_resources (
    app_id       uuid NOT NULL REFERENCES apps (app_id),
    resource_id  uuid NOT NULL REFERENCES resources (resource_id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz,
    PRIMARY KEY (app_id, resource_id)
);

CREATE TABLE routes (
    route_id        uuid PRIMARY KEY,
    type            text NOT NULL CHECK (type IN ('http', 'tcp')),
    app_id          uuid REFERENCES apps (app_id),
    parent_ref      text,
    service         text NOT NULL,
    leader          boolean NOT NULL DEFAULT false,
    drain_backends  boolean NOT NULL DEFAULT false,
    domain          text,
    path            text,
    sticky          boolean NOT NULL DEFAULT false,
    tls_cert        text,
    tls_key         text,
    port            integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE UNIQUE INDEX routes_http_domain_path_idx ON routes (lower(domain), path)
    WHERE type = 'http' AND deleted_at IS NULL;
CREATE UNIQUE INDEX routes_tcp_port_idx ON routes (port) WHERE type = 'tcp' AND deleted_at IS NULL;

CREATE TABLE events (
    event_id     bigserial PRIMARY KEY,
    app_id       uuid,
    object_type  text NOT NULL,
    object_id    text NOT NULL,
    unique_id    text UNIQUE,
    data         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_app_idx ON events (app_id, event_id);
CREATE INDEX events_type_idx ON events (object_type, event_id);

-- asynchronous work (app deletion, later deployments): claimed with FOR UPDATE SKIP LOCKED
CREATE TABLE tasks (
    task_id     bigserial PRIMARY KEY,
    kind        text NOT NULL,
    args        jsonb NOT NULL,
    run_at      timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz
);
CREATE INDEX tasks_pending_idx ON tasks (run_at) WHERE done_at IS NULL;
