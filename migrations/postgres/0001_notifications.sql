-- Run by `sqlx::migrate!` at start-up, under sqlx's advisory lock
-- (`pg_advisory_lock` keyed on the database name), so nodes starting together
-- apply it once; `IF NOT EXISTS` keeps it harmless to repeat by hand.

-- One row per user: the counter that hands out seqs. Appends lock it until
-- they commit, which is what keeps seqs gapless and in commit order across
-- nodes. Kept when retention purges the user's notifications, so a seq is
-- never reused.
CREATE TABLE IF NOT EXISTS users (
    user_id  TEXT   PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS notifications (
    user_id         TEXT    NOT NULL,
    seq             BIGINT  NOT NULL,
    id              TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    payload         TEXT    NOT NULL,          -- JSON text, byte-exact as published
    created_at      BIGINT  NOT NULL,          -- unix milliseconds
    read            BOOLEAN NOT NULL DEFAULT false,
    idempotency_key TEXT,
    PRIMARY KEY (user_id, seq)
);

CREATE UNIQUE INDEX IF NOT EXISTS notifications_idempotency
    ON notifications (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Retention deletes by age.
CREATE INDEX IF NOT EXISTS notifications_created_at ON notifications (created_at);
-- Unread counts read this partial index only.
CREATE INDEX IF NOT EXISTS notifications_unread ON notifications (user_id, topic) WHERE NOT read;
