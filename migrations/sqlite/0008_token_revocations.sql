-- Single tokens revoked (`POST /v1/users/{id}/tokens/{jti}/revoke`): the
-- user's token whose `jti` claim this is is refused; the user's other tokens
-- are not. `expires_at` (unix seconds, NULL: never) is when the token
-- expires; the purge deletes the row after that. The node holds the table in
-- memory, read at start.
CREATE TABLE token_revocations (
    user_id    TEXT    NOT NULL,
    jti        TEXT    NOT NULL,
    expires_at INTEGER,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, jti)
) WITHOUT ROWID;
CREATE INDEX token_revocations_expires ON token_revocations (expires_at);
