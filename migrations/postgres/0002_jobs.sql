-- Durable work any node's workers can take: large-audience publishes (jobs)
-- and digest windows. See server/src/store/jobs.rs for the lease rules.

CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT    PRIMARY KEY,
    kind            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,          -- JSON text the kind understands
    state           TEXT    NOT NULL,          -- queued | running | done | failed
    attempts        BIGINT NOT NULL,
    done            BIGINT NOT NULL,
    total           BIGINT NOT NULL,
    error           TEXT,                      -- the last failure's reason
    owner           TEXT,                      -- the worker holding the lease
    lease_until     BIGINT,                    -- unix milliseconds
    due_at          BIGINT  NOT NULL,         -- a queued job runs from then on
    idempotency_key TEXT    UNIQUE,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (due_at) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (lease_until) WHERE state = 'running';

-- One row per window. At most one open (unsealed) window per (user, key);
-- a sealed one is closing and takes no more entries.
CREATE TABLE IF NOT EXISTS digest_windows (
    id          TEXT    PRIMARY KEY,
    user_id     TEXT    NOT NULL,
    digest_key  TEXT    NOT NULL,
    topic       TEXT    NOT NULL,              -- the first entry's
    first_at    BIGINT NOT NULL,
    last_at     BIGINT NOT NULL,
    count       BIGINT NOT NULL,
    closes_at   BIGINT NOT NULL,
    sealed      SMALLINT NOT NULL,             -- 0 open, 1 closing (a number, so both stores run the same statements)
    owner       TEXT,
    lease_until BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS digest_windows_open ON digest_windows (user_id, digest_key) WHERE sealed = 0;
CREATE INDEX IF NOT EXISTS digest_windows_closes ON digest_windows (closes_at);

-- The first ten entries' payloads of each window, byte-exact, numbered from 1.
CREATE TABLE IF NOT EXISTS digest_items (
    window_id TEXT    NOT NULL,
    n         BIGINT NOT NULL,
    payload   TEXT    NOT NULL,
    PRIMARY KEY (window_id, n)
);
