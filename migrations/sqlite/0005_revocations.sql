-- Token revocations (`POST /v1/users/{id}/tokens/revoke`): a user's tokens
-- issued before `issued_before` (unix seconds) are refused. One row per user
-- ever revoked; the value only moves forward. `expires_at` (unix seconds,
-- NULL: never) is when every token it covers has expired; the purge deletes
-- it after that. The node holds the table in memory, read at start.
CREATE TABLE revocations (
    user_id       TEXT    PRIMARY KEY NOT NULL,
    issued_before INTEGER NOT NULL,
    expires_at    INTEGER,
    updated_ms    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX revocations_expires ON revocations (expires_at);
