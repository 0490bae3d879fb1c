-- Idempotency keys of digest entries: a publish with `digest` and an
-- `idempotency_key` adds its entry to a user's window once; a repeat answers
-- what the first did (`count` is the entry's place in its window). A key
-- lives as long as the digest notification its entry went into: retention
-- deletes it once its window's close is older than `HERALD_RETENTION`, and
-- erasing all of a user's notifications deletes the user's keys.
CREATE TABLE IF NOT EXISTS digest_entry_keys (
    user_id         TEXT   NOT NULL,
    idempotency_key TEXT   NOT NULL,
    window_id       TEXT   NOT NULL,
    count           BIGINT NOT NULL,
    closes_at       BIGINT NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS digest_entry_keys_closes ON digest_entry_keys (closes_at);
