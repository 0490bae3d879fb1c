-- Token revocations (`POST /v1/users/{id}/tokens/revoke`): a user's tokens
-- issued before `issued_before` (unix seconds) are refused. One row per user
-- ever revoked; the value only moves forward. The node holds the table in
-- memory, read at start.
CREATE TABLE revocations (
    user_id       TEXT    PRIMARY KEY NOT NULL,
    issued_before INTEGER NOT NULL,
    updated_ms    INTEGER NOT NULL
) WITHOUT ROWID;
