-- Token revocations (`POST /v1/users/{id}/tokens/revoke`): a user's tokens
-- issued before `issued_before` (unix seconds) are refused. One row per user
-- ever revoked; the value only moves forward. `expires_at` (unix seconds,
-- NULL: never) is when every token it covers has expired; the purge deletes
-- it after that. Every node holds the table in memory and re-reads the rows
-- changed since its last look (`updated_ms`, the database's clock) on each
-- repair tick.
CREATE TABLE revocations (
    user_id       TEXT   PRIMARY KEY,
    issued_before BIGINT NOT NULL,
    expires_at    BIGINT,
    updated_ms    BIGINT NOT NULL
);
CREATE INDEX revocations_updated ON revocations (updated_ms);
CREATE INDEX revocations_expires ON revocations (expires_at);
