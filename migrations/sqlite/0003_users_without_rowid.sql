-- The counter rows, clustered on `user_id` (WITHOUT ROWID): with a rowid
-- table every lookup by user went through the primary-key index and then
-- into the table, two B-tree descents where one will do. Each group commit
-- reads and writes the counter of every user it touches, and each session's
-- `head` reads it once, so this halves the counters' share of the writer's
-- page visits (docs/BENCHMARKS.md). Same columns, same rows.
CREATE TABLE users_clustered (
    user_id  TEXT    PRIMARY KEY NOT NULL,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO users_clustered (user_id, last_seq) SELECT user_id, last_seq FROM users;
DROP TABLE users;
ALTER TABLE users_clustered RENAME TO users;
