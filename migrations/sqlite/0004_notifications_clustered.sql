-- The notifications, clustered on (user_id, seq) (WITHOUT ROWID): in a
-- rowid table a user's rows lie wherever their commits put them, so a
-- replay of 50 read 50 scattered table pages after the primary-key index
-- (half of the node's CPU in a reconnect storm went to those lookups);
-- clustered, they sit side by side in one or two leaves, and a publish
-- writes one B-tree where it wrote two. Same columns, rows and indexes.
CREATE TABLE notifications_clustered (
    user_id         TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    id              TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    payload         TEXT    NOT NULL,          -- JSON text
    created_at      INTEGER NOT NULL,          -- unix milliseconds
    read            INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
INSERT INTO notifications_clustered
    (user_id, seq, id, topic, payload, created_at, read, idempotency_key)
    SELECT user_id, seq, id, topic, payload, created_at, read, idempotency_key FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_clustered RENAME TO notifications;
CREATE UNIQUE INDEX notifications_idempotency
    ON notifications (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX notifications_created_at ON notifications (created_at);
CREATE INDEX notifications_unread ON notifications (user_id, topic) WHERE read = 0;
