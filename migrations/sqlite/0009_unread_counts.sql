-- Unread counts as counters, one row per (user, topic), in place of the
-- partial index `notifications_unread`. The index held an entry per unread
-- notification, so every publish to a random user dirtied a random leaf of
-- it (as many pages as the notifications themselves: ≈20% of batched
-- storing, docs/BENCHMARKS.md); the counters are one row per user and
-- topic, a few hundred pages that a group commit's users share, and
-- `GET /v1/me/unread` reads a user's few rows instead of counting entries.
--
-- Triggers keep them: every insert, read mark and delete of a notification
-- (publishes, read marks, retention, erasure, whatever writes the table)
-- moves its counter in the same transaction, so they cannot drift from the
-- rows. A counter that reaches 0 stays (the next notification of that
-- topic reuses it); the reads skip it.
CREATE TABLE unread_counts (
    user_id TEXT    NOT NULL,
    topic   TEXT    NOT NULL,
    n       INTEGER NOT NULL,
    PRIMARY KEY (user_id, topic)
) WITHOUT ROWID;

INSERT INTO unread_counts (user_id, topic, n)
    SELECT user_id, topic, COUNT(*) FROM notifications WHERE read = 0 GROUP BY user_id, topic;

CREATE TRIGGER notifications_unread_inserted AFTER INSERT ON notifications WHEN NEW.read = 0
BEGIN
    INSERT INTO unread_counts (user_id, topic, n) VALUES (NEW.user_id, NEW.topic, 1)
        ON CONFLICT (user_id, topic) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER notifications_unread_marked AFTER UPDATE OF read ON notifications
    WHEN (OLD.read = 0) <> (NEW.read = 0)
BEGIN
    UPDATE unread_counts SET n = n + CASE WHEN NEW.read = 0 THEN 1 ELSE -1 END
        WHERE user_id = OLD.user_id AND topic = OLD.topic;
END;

CREATE TRIGGER notifications_unread_deleted AFTER DELETE ON notifications WHEN OLD.read = 0
BEGIN
    UPDATE unread_counts SET n = n - 1 WHERE user_id = OLD.user_id AND topic = OLD.topic;
END;

DROP INDEX notifications_unread;

-- Every notification of the user with `seq <= read_floor` is read. "Mark
-- everything read up to N" raises it; the statements that look for unread
-- notifications (read marks, unread-only inbox pages) start above it, so
-- they walk what arrived since rather than the user's whole history, which
-- the index above used to spare them.
ALTER TABLE users ADD COLUMN read_floor INTEGER NOT NULL DEFAULT 0;
