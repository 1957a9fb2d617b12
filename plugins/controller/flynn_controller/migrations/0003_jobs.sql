-- What the scheduler reports of each job (Flynn's job_cache): its host, state and exit, so
-- `GET /apps/:app/jobs` and the `job` events are true without asking every host.
CREATE TABLE jobs (
    job_id        text PRIMARY KEY,
    host_id       text NOT NULL,
    app_id        uuid NOT NULL REFERENCES apps (app_id),
    release_id    uuid REFERENCES releases (release_id),
    process_type  text,
    state         text NOT NULL,
    cmd           jsonb,
    meta          jsonb,
    exit_status   integer,
    host_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_app_idx ON jobs (app_id, created_at);
