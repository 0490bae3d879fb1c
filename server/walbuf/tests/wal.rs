//! The VFS against real SQLite connections on a real file: what one
//! connection commits through it, others read; a rolled-back transaction's
//! spilled frames never overwrite another connection's commit; and a commit
//! reaches the kernel in a few writes, not two per page.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

/// The write counters are per process: the tests take turns.
static COUNTERS: Mutex<()> = Mutex::new(());

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-walbuf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("test.db")
}

fn open_buffered(path: &Path) -> Connection {
    herald_walbuf::register().unwrap();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags_and_vfs(path, flags, herald_walbuf::NAME).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    conn
}

/// A new database with table `t`, and a connection to it through the VFS.
fn new_buffered(name: &str) -> (PathBuf, Connection) {
    let path = temp_db(name);
    let conn = open_buffered(&path);
    conn.execute_batch("CREATE TABLE t (owner TEXT, n INTEGER, body TEXT, PRIMARY KEY (owner, n))").unwrap();
    (path, conn)
}

fn open_plain(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    conn
}

fn rows(conn: &Connection, owner: &str) -> Vec<(i64, String)> {
    let mut st = conn.prepare("SELECT n, body FROM t WHERE owner = ? ORDER BY n").unwrap();
    st.query_map([owner], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

fn body(owner: &str, n: i64) -> String {
    format!("{owner}-{n}-").repeat(40)
}

fn insert(conn: &Connection, owner: &str, range: std::ops::Range<i64>) {
    let mut st = conn.prepare_cached("INSERT INTO t (owner, n, body) VALUES (?, ?, ?)").unwrap();
    for n in range {
        st.execute((owner, n, body(owner, n))).unwrap();
    }
}

fn integrity(conn: &Connection) -> String {
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
}

#[test]
fn commits_through_it_are_read_by_other_connections_and_survive_reopening() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let (path, writer) = new_buffered("commits");
    let reader = open_plain(&path);
    for round in 0..20 {
        let tx = writer.unchecked_transaction().unwrap();
        insert(&tx, "w", round * 100..(round + 1) * 100);
        tx.commit().unwrap();
        // Another connection (the default VFS) sees the commit at once.
        let seen = rows(&reader, "w");
        assert_eq!(seen.len() as i64, (round + 1) * 100);
        assert_eq!(seen.last().unwrap(), &((round + 1) * 100 - 1, body("w", (round + 1) * 100 - 1)));
    }
    drop(reader);
    drop(writer);
    let again = open_plain(&path);
    assert_eq!(integrity(&again), "ok");
    let all = rows(&again, "w");
    assert_eq!(all.len(), 2000);
    assert!(all.iter().enumerate().all(|(i, (n, b))| *n == i as i64 && *b == body("w", *n)));
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

#[test]
fn a_commit_reaches_the_kernel_in_a_few_writes() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let (path, writer) = new_buffered("coalesce");
    let (writes, bytes) = herald_walbuf::wal_writes();
    let tx = writer.unchecked_transaction().unwrap();
    insert(&tx, "w", 0..2000); // ≈2,000 × 250 bytes: about 150 pages
    tx.commit().unwrap();
    let (writes, bytes) = (herald_walbuf::wal_writes().0 - writes, herald_walbuf::wal_writes().1 - bytes);
    let frames = bytes / (4096 + 24);
    assert!(frames > 100, "{frames} frames");
    // SQLite alone makes two writes per frame; through the VFS the commit is
    // one run, passed on in 64 KiB pieces (plus the WAL header when this is
    // the WAL's first transaction).
    assert!(writes <= bytes.div_ceil(64 << 10) + 1, "{writes} writes for {frames} frames ({bytes} bytes)");
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

#[test]
fn a_rolled_back_transactions_spilled_frames_never_land_on_another_connections_commit() {
    let _turn = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let (path, buffered) = new_buffered("spill");
    // An empty WAL, and no checkpoints: the WAL keeps every frame where it was written.
    buffered.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA wal_autocheckpoint = 0").unwrap();
    // A page cache of 10 pages: a large transaction spills its pages to the
    // WAL before it commits. Rolled back, it reads its pages back from the
    // database file (the WAL has no committed frame), not from the WAL.
    buffered.pragma_update(None, "cache_size", 10).unwrap();
    {
        let tx = buffered.unchecked_transaction().unwrap();
        insert(&tx, "spilled", 0..3000);
        tx.rollback().unwrap();
    }
    // Another connection appends from the start of the WAL, over where the
    // spilled frames were, and commits.
    let other = open_plain(&path);
    other.execute_batch("PRAGMA wal_autocheckpoint = 0; BEGIN IMMEDIATE").unwrap();
    insert(&other, "other", 0..20_000);
    other.execute_batch("COMMIT").unwrap();
    // The buffered connection writes again, after the other's frames.
    let tx = buffered.unchecked_transaction().unwrap();
    insert(&tx, "later", 0..300);
    tx.commit().unwrap();
    for conn in [&other, &buffered] {
        assert_eq!(integrity(conn), "ok");
        assert!(rows(conn, "spilled").is_empty());
        for (owner, n) in [("other", 20_000), ("later", 300)] {
            let got = rows(conn, owner);
            assert_eq!(got.len(), n, "{owner}");
            assert!(got.iter().all(|(n, b)| *b == body(owner, *n)), "{owner}'s rows intact");
        }
    }
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}
