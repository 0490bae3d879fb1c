-- One row per user: the counter that hands out seqs. Kept when retention
-- purges the user's notifications, so a seq is never reused.
CREATE TABLE IF NOT EXISTS users (
    user_id  TEXT    PRIMARY KEY NOT NULL,
    last_seq INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS notifications (
    user_id         TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    id              TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    payload         TEXT    NOT NULL,          -- JSON text
    created_at      INTEGER NOT NULL,          -- unix milliseconds
    read            INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    PRIMARY KEY (user_id, seq)
);

CREATE UNIQUE INDEX IF NOT EXISTS notifications_idempotency
    ON notifications (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS notifications_created_at ON notifications (created_at);
-- Unread counts read this partial index only.
CREATE INDEX IF NOT EXISTS notifications_unread ON notifications (user_id, topic) WHERE read = 0;
