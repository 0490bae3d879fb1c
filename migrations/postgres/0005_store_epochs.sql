-- Store epochs: which history of the store a client's seqs belong to.
-- A restore from a backup (`herald mark-restored` after pg_restore or a
-- point-in-time recovery) ends the current epoch, recording in `store_forks`
-- each user's counter at that moment: seqs up to it are the same in both
-- histories; later ones of the ended epoch were lost and are handed out
-- again. The welcome frame carries the current epoch; a client that sends
-- back an older one resumes from the fork instead of its own cursor
-- (docs/protocol.md, "Resuming").
CREATE TABLE store_epochs (
    ordinal     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    epoch       TEXT   NOT NULL UNIQUE,
    restored_ms BIGINT                      -- NULL for the first epoch
);
INSERT INTO store_epochs (epoch) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 16));
CREATE TABLE store_forks (
    epoch   TEXT   NOT NULL,
    user_id TEXT   NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (epoch, user_id)
);
