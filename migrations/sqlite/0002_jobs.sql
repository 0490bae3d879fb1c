-- Durable work any node's workers can take: large-audience publishes (jobs)
-- and digest windows. See server/src/store/jobs.rs for the lease rules.

CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT    PRIMARY KEY NOT NULL,
    kind            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,          -- JSON text the kind understands
    state           TEXT    NOT NULL,          -- queued | running | done | failed
    attempts        INTEGER NOT NULL,
    done            INTEGER NOT NULL,
    total           INTEGER NOT NULL,
    error           TEXT,                      -- the last failure's reason
    owner           TEXT,                      -- the worker holding the lease
    lease_until     INTEGER,                   -- unix milliseconds
    due_at          INTEGER NOT NULL,          -- a queued job runs from then on
    idempotency_key TEXT    UNIQUE,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (due_at) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (lease_until) WHERE state = 'running';

-- One row per window. At most one open (unsealed) window per (user, key);
-- a sealed one is closing and takes no more entries.
CREATE TABLE IF NOT EXISTS digest_windows (
    id          TEXT    PRIMARY KEY NOT NULL,
    user_id     TEXT    NOT NULL,
    digest_key  TEXT    NOT NULL,
    topic       TEXT    NOT NULL,              -- the first entry's
    first_at    INTEGER NOT NULL,
    last_at     INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    closes_at   INTEGER NOT NULL,
    sealed      INTEGER NOT NULL,              -- 0 open, 1 closing
    owner       TEXT,
    lease_until INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS digest_windows_open ON digest_windows (user_id, digest_key) WHERE sealed = 0;
CREATE INDEX IF NOT EXISTS digest_windows_closes ON digest_windows (closes_at);

-- The first ten entries' payloads of each window, byte-exact, numbered from 1.
CREATE TABLE IF NOT EXISTS digest_items (
    window_id TEXT    NOT NULL,
    n         INTEGER NOT NULL,
    payload   TEXT    NOT NULL,
    PRIMARY KEY (window_id, n)
);
