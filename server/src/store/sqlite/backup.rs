//! `herald backup`: a copy of the SQLite store taken while a node runs.
//!
//! Copying `herald.db` with `cp` is not a backup: the newest commits live in
//! `herald.db-wal` until a checkpoint moves them, and a copy of the two files
//! taken while the writer appends can hold half a transaction. This takes the
//! copy inside one read transaction instead (SQLite's `VACUUM INTO`), so it
//! is the database exactly as it was at one commit: every notification
//! acknowledged before the backup began, none half-written. Readers never
//! block the writer in WAL mode, so publishing goes on meanwhile; only the
//! WAL cannot be checkpointed past the backup's snapshot until it ends.
//!
//! The copy is then checked (`PRAGMA integrity_check`, and that no stored
//! notification is beyond its user's counter) and synced to disk before
//! [`backup`] returns.
//!
//! `herald restore` puts such a copy in place of a stopped node's database
//! ([`restore`]): checked the same way first, the replaced files moved aside,
//! never deleted. The caller then marks the store restored (a new epoch, see
//! [`EpochStore::mark_restored`](crate::store::EpochStore::mark_restored)).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::reader::store_error;
use crate::store::StoreError;

/// What [`backup`] wrote.
#[derive(Debug)]
pub struct Backup {
    pub file: PathBuf,
    pub bytes: u64,
    pub users: i64,
    pub notifications: i64,
}

/// Copies the database at `source` into the new file `to` (which must not
/// exist) as a consistent snapshot, checks the copy and syncs it. A failed
/// backup leaves no file at `to`.
pub fn backup(source: &Path, to: &Path) -> Result<Backup, StoreError> {
    if !source.is_file() {
        return Err(StoreError::Internal(format!("there is no database at {}", source.display())));
    }
    if to.exists() {
        return Err(StoreError::Internal(format!("{} already exists; a backup never overwrites", to.display())));
    }
    let target = to.to_str().ok_or_else(|| StoreError::Internal(format!("{} is not UTF-8", to.display())))?;
    let copied = (|| {
        let conn = super::reader::open(source)?;
        conn.execute("VACUUM INTO ?1", [target]).map_err(store_error)?;
        drop(conn);
        check(to)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

/// Checks the copy at `file` and syncs it (and its directory) to disk.
fn check(file: &Path) -> Result<Backup, StoreError> {
    let (users, notifications) = inspect(file)?;
    let bytes = sync(file)?;
    Ok(Backup { file: file.to_path_buf(), bytes, users, notifications })
}

/// (user, topic) pairs whose unread counter (migration 0009) is not the
/// number of their unread notifications, either way.
const MISCOUNTED_SQL: &str = "WITH counted AS (
        SELECT user_id, topic, COUNT(*) AS n FROM notifications WHERE read = 0 GROUP BY user_id, topic),
      kept AS (SELECT user_id, topic, n FROM unread_counts WHERE n <> 0)
    SELECT COUNT(*) FROM (
        SELECT user_id, topic FROM (SELECT * FROM counted EXCEPT SELECT * FROM kept)
        UNION SELECT user_id, topic FROM (SELECT * FROM kept EXCEPT SELECT * FROM counted))";

/// Unread notifications at or below their user's `read_floor`, which says
/// every one there is read.
const UNREAD_BELOW_FLOOR_SQL: &str = "SELECT COUNT(*) FROM notifications n JOIN users u ON u.user_id = n.user_id
     WHERE n.read = 0 AND n.seq <= u.read_floor";

/// `PRAGMA integrity_check`, no notification beyond its user's counter, and
/// the unread counters and read floors true to the rows; `(users,
/// notifications)`. Read-only: safe beside a running node (it reads
/// one snapshot).
pub(super) fn inspect(file: &Path) -> Result<(i64, i64), StoreError> {
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(store_error)?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(store_error)?;
    if integrity != "ok" {
        return Err(StoreError::Internal(format!("{} failed its integrity check: {integrity}", file.display())));
    }
    let beyond: i64 = conn.query_row(crate::store::BEYOND_COUNTER_SQL, [], |r| r.get(0)).map_err(store_error)?;
    if beyond != 0 {
        return Err(StoreError::Internal(format!(
            "{} has {beyond} notifications beyond their user's counter",
            file.display()
        )));
    }
    let miscounted: i64 = conn.query_row(MISCOUNTED_SQL, [], |r| r.get(0)).map_err(store_error)?;
    if miscounted != 0 {
        return Err(StoreError::Internal(format!(
            "{} has {miscounted} unread counters that disagree with the notifications",
            file.display()
        )));
    }
    let below_floor: i64 = conn.query_row(UNREAD_BELOW_FLOOR_SQL, [], |r| r.get(0)).map_err(store_error)?;
    if below_floor != 0 {
        return Err(StoreError::Internal(format!(
            "{} has {below_floor} unread notifications at or below their user's read floor",
            file.display()
        )));
    }
    let users = conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0)).map_err(store_error)?;
    let notifications = conn.query_row("SELECT COUNT(*) FROM notifications", [], |r| r.get(0)).map_err(store_error)?;
    Ok((users, notifications))
}

/// Syncs `file` and its directory to disk; the file's size.
fn sync(file: &Path) -> Result<u64, StoreError> {
    let io = |e: std::io::Error| StoreError::Internal(format!("syncing {}: {e}", file.display()));
    let written = std::fs::File::open(file).map_err(io)?;
    written.sync_all().map_err(io)?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    written.metadata().map(|m| m.len()).map_err(io)
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restore {
    pub users: i64,
    pub notifications: i64,
    /// The database's files it replaced, and where they were moved.
    pub moved_aside: Vec<(PathBuf, PathBuf)>,
}

/// Puts the backup `from` in place of the database at `database` (whose
/// node must be stopped): checks it, copies it beside the database, moves
/// the database and its `-wal` and `-shm` files aside (to
/// `<database>.replaced-<unix ms>` and that name's `-wal` and `-shm`, so the
/// old database still opens as it was; a WAL left beside the restored file
/// would belong to the other database), then renames the copy into place.
pub fn restore(from: &Path, database: &Path) -> Result<Restore, StoreError> {
    let (users, notifications) = inspect(from)?;
    if database.exists() {
        ensure_unused(database)?;
    }
    let io = |what: &str, e: std::io::Error| StoreError::Internal(format!("{what}: {e}"));
    let staged = sibling(database, ".restoring");
    std::fs::copy(from, &staged).map_err(|e| io("copying the backup", e))?;
    let staged_ok = sync(&staged);
    if let Err(e) = staged_ok {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    let replaced = sibling(database, &format!(".replaced-{}", crate::store::now_ms()));
    let mut moved_aside = Vec::new();
    for ending in ["", "-wal", "-shm"] {
        let file = sibling(database, ending);
        if file.exists() {
            let aside = sibling(&replaced, ending);
            std::fs::rename(&file, &aside).map_err(|e| io("moving the database aside", e))?;
            moved_aside.push((file, aside));
        }
    }
    std::fs::rename(&staged, database).map_err(|e| io("putting the backup in place", e))?;
    sync(database)?;
    Ok(Restore { users, notifications, moved_aside })
}

/// Fails when another connection has the database open — a node still
/// running on it: an exclusive lock (SQLite's `locking_mode=EXCLUSIVE`)
/// cannot be had beside a WAL-mode connection, even an idle one.
fn ensure_unused(database: &Path) -> Result<(), StoreError> {
    let in_use =
        || StoreError::Internal(format!("{} is in use (is a node running on it?): stop it first", database.display()));
    let conn = Connection::open_with_flags(database, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(store_error)?;
    conn.busy_timeout(std::time::Duration::ZERO).map_err(store_error)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE").map_err(store_error)?;
    conn.execute_batch("BEGIN EXCLUSIVE; ROLLBACK;").map_err(|_| in_use())?;
    Ok(())
}

/// `file` with `ending` appended to its name.
fn sibling(file: &Path, ending: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(ending);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(dir: &Path) -> PathBuf {
        let file = dir.join("herald.db");
        let conn = Connection::open(&file).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE users (user_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL,
                                 read_floor INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE notifications (user_id TEXT, seq INTEGER, topic TEXT NOT NULL DEFAULT 't',
                                         read INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, seq));
             CREATE TABLE unread_counts (user_id TEXT, topic TEXT, n INTEGER, PRIMARY KEY (user_id, topic));
             INSERT INTO users (user_id, last_seq) VALUES ('a', 2);
             INSERT INTO notifications (user_id, seq) VALUES ('a', 1), ('a', 2);
             INSERT INTO unread_counts VALUES ('a', 't', 2);",
        )
        .unwrap();
        file
    }

    #[test]
    fn copies_checks_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let source = database(dir.path());
        let to = dir.path().join("copy.db");
        let copy = backup(&source, &to).unwrap();
        assert_eq!((copy.users, copy.notifications), (1, 2));
        assert!(copy.bytes > 0);
        std::fs::write(dir.path().join("kept.db"), b"mine").unwrap();
        let refused = backup(&source, &dir.path().join("kept.db")).unwrap_err();
        assert!(refused.to_string().contains("already exists"), "{refused}");
        assert_eq!(std::fs::read(dir.path().join("kept.db")).unwrap(), b"mine");
        let missing = backup(&dir.path().join("nothing.db"), &dir.path().join("x.db")).unwrap_err();
        assert!(missing.to_string().contains("no database"), "{missing}");
        assert!(!dir.path().join("x.db").exists());
    }

    #[test]
    fn a_copy_that_fails_its_check_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let source = database(dir.path());
        // A notification beyond its user's counter: not what a consistent store holds.
        Connection::open(&source)
            .unwrap()
            .execute("INSERT INTO notifications (user_id, seq) VALUES ('a', 3)", [])
            .unwrap();
        let to = dir.path().join("copy.db");
        let refused = backup(&source, &to).unwrap_err();
        assert!(refused.to_string().contains("beyond their user's counter"), "{refused}");
        assert!(!to.exists(), "a failed backup left its file");
    }

    /// Unread counters that miscount the rows, or a read floor with an
    /// unread notification under it, fail the check; a counter left at 0
    /// once its notifications were read does not.
    #[test]
    fn read_state_that_disagrees_with_the_rows_fails_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let source = database(dir.path());
        let conn = Connection::open(&source).unwrap();
        for (damage, mend, complaint) in [
            ("UPDATE unread_counts SET n = 1", "UPDATE unread_counts SET n = 2", "1 unread counters that disagree"),
            ("DELETE FROM unread_counts", "INSERT INTO unread_counts VALUES ('a', 't', 2)", "unread counters"),
            (
                "INSERT INTO unread_counts VALUES ('a', 'u', 1)",
                "DELETE FROM unread_counts WHERE topic = 'u'",
                "unread counters",
            ),
            (
                "UPDATE users SET read_floor = 1",
                "UPDATE users SET read_floor = 0",
                "1 unread notifications at or below",
            ),
        ] {
            conn.execute(damage, []).unwrap();
            let refused = inspect(&source).unwrap_err();
            assert!(refused.to_string().contains(complaint), "{damage}: {refused}");
            conn.execute(mend, []).unwrap();
            assert_eq!(inspect(&source).unwrap(), (1, 2), "after {mend}");
        }
        conn.execute_batch(
            "UPDATE notifications SET read = 1; UPDATE unread_counts SET n = 0; UPDATE users SET read_floor = 2",
        )
        .unwrap();
        assert_eq!(inspect(&source).unwrap(), (1, 2), "a counter at 0 with nothing unread");
    }
}
