-- Single tokens revoked (`POST /v1/users/{id}/tokens/{jti}/revoke`): the
-- user's token whose `jti` claim this is is refused; the user's other tokens
-- are not. `expires_at` (unix seconds, NULL: never) is when the token
-- expires; the purge deletes the row after that. Every node holds the table
-- in memory and re-reads the rows changed since its last look (`updated_ms`,
-- the database's clock) on each repair tick, as it does `revocations`.
CREATE TABLE token_revocations (
    user_id    TEXT   NOT NULL,
    jti        TEXT   NOT NULL,
    expires_at BIGINT,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, jti)
);
CREATE INDEX token_revocations_updated ON token_revocations (updated_ms);
CREATE INDEX token_revocations_expires ON token_revocations (expires_at);
