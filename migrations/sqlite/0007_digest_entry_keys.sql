-- Idempotency keys of digest entries: a publish with `digest` and an
-- `idempotency_key` adds its entry to a user's window once; a repeat answers
-- what the first did (`count` is the entry's place in its window). A key
-- lives as long as the digest notification its entry went into: retention
-- deletes it once its window's close is older than `HERALD_RETENTION`, and
-- erasing all of a user's notifications deletes the user's keys.
CREATE TABLE digest_entry_keys (
    user_id         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    window_id       TEXT    NOT NULL,
    count           INTEGER NOT NULL,
    closes_at       INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
) WITHOUT ROWID;
CREATE INDEX digest_entry_keys_closes ON digest_entry_keys (closes_at);
