-- Every append updates its user's counter row. With room left on each page
-- the new row version goes beside the old one (a HOT update: no new index
-- entry), and the page is pruned as it fills, so head lookups do not walk
-- long chains of dead versions between autovacuum runs.
ALTER TABLE users SET (fillfactor = 50);
