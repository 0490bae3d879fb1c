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

/// `PRAGMA integrity_check`, and no notification beyond its user's counter;
/// `(users, notifications)`. Read-only: safe beside a running node (it reads
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
             CREATE TABLE users (user_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
             CREATE TABLE notifications (user_id TEXT, seq INTEGER, PRIMARY KEY (user_id, seq));
             INSERT INTO users VALUES ('a', 2);
             INSERT INTO notifications VALUES ('a', 1), ('a', 2);",
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
        Connection::open(&source).unwrap().execute("INSERT INTO notifications VALUES ('a', 3)", []).unwrap();
        let to = dir.path().join("copy.db");
        let refused = backup(&source, &to).unwrap_err();
        assert!(refused.to_string().contains("beyond their user's counter"), "{refused}");
        assert!(!to.exists(), "a failed backup left its file");
    }
}
