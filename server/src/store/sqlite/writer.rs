//! The one writer: a thread of its own with one connection, committing
//! whatever has queued up in a single `BEGIN IMMEDIATE` transaction (group
//! commit). SQLite has one writer at a time anyway, and one fsync then
//! covers many publishes. Inside it, the group's counters and repeated
//! idempotency keys are read, seqs decided in Rust ([`crate::store::plan`]),
//! and the rows and counters written with prepared statements; in-process,
//! a statement costs microseconds, not a hand-off to another thread.
//!
//! The queue is bounded ([`QUEUE`]): when it is full, publishers wait.
//!
//! Large deletes (retention, erasure) come here too, a chunk per request,
//! each a transaction of its own between two group commits. Run from
//! another connection they would starve this one: SQLite's busy handler
//! sleeps ever longer between tries, and a delete loop takes the lock back
//! at once (a 100,000-row erasure held publishes up for ≈300 ms that way;
//! docs/BENCHMARKS.md).
//!
//! The other way round, this thread would starve the store's other writes
//! (read marks, jobs, digest windows, revocations, on the sqlx pool): under
//! a steady publishing load it begins the next group the moment one
//! commits, and a statement waiting in SQLite's busy handler wakes up to
//! find the lock taken again, for up to its 5 s timeout, then fails. So
//! writes take turns through a [`Gate`]: a fair (first come, first served)
//! lock this thread holds for each transaction and those writes hold for
//! theirs. A read mark then waits for at most the group in progress, and a
//! group for at most the writes that asked before it. (A write whose
//! request is cancelled gives its turn back while sqlx may still be running
//! the statement; this thread then waits in its busy handler, as before.)

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, OwnedMutexGuard};

use super::reader::{closed, open_with, store_error, NotificationColumns};
use crate::store::plan::{Key, Plan};
use crate::store::{Appended, CommitLog, GroupCommits, NewNotification, StoreError, StoredNotification};

/// Most notifications committed in one group transaction.
const MAX_GROUP: usize = 2048;
/// Requests waiting for the writer; a full queue makes publishers wait.
const QUEUE: usize = 1024;
/// WAL pages (4 KiB) after which a commit copies them back into the
/// database file (SQLite's default is 1,000). A checkpoint copies each page
/// once however many commits changed it, and a group commit of random users
/// writes thousands of pages, many of them the same index and counter pages
/// as the groups before: at 1,000 nearly every commit paid for a checkpoint
/// (20% of the writer's time); at 16,384 (a 64 MiB WAL) batched storing went
/// from ~38k to ~47k notifications/s. Since the notifications are clustered
/// by user (migration 0004) a group dirties a table leaf per row rather than
/// appending, and at 65,536 (a 256 MiB WAL) batched storing went from ~62k
/// to ~78k/s (docs/BENCHMARKS.md). Every connection that writes uses the
/// same threshold, so none checkpoints early.
pub(super) const CHECKPOINT_PAGES: i64 = 65_536;
/// Once checkpointed, the WAL file is cut back to this size (bytes).
const WAL_SIZE_LIMIT: i64 = CHECKPOINT_PAGES * 4096;

/// Turns at SQLite's write lock between this thread and the writes made on
/// the sqlx pool (the module doc). A cheap handle; fair: turns are granted
/// in the order they were asked for.
#[derive(Clone, Default)]
pub(super) struct Gate(Arc<tokio::sync::Mutex<()>>);

impl Gate {
    /// Waits for this task's turn; the turn lasts until the guard drops.
    pub async fn turn(&self) -> OwnedMutexGuard<()> {
        self.0.clone().lock_owned().await
    }

    /// [`turn`](Self::turn) for the writer thread (not a runtime thread).
    fn blocking_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.blocking_lock()
    }
}

type AppendReply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;
type DeleteReply = oneshot::Sender<Result<u64, StoreError>>;

enum Request {
    Append(Vec<NewNotification>, AppendReply),
    /// One `DELETE` statement and its parameters, run alone.
    Delete(&'static str, Vec<Value>, DeleteReply),
    Close(oneshot::Sender<()>),
}

/// A handle on the writer thread.
pub(super) struct Writer {
    queue: mpsc::Sender<Request>,
}

impl Writer {
    /// Opens the writer's connection and starts its thread, which takes its
    /// turns through `gate` and records each group in `metrics`.
    pub fn start(path: &Path, cache_mib: u32, gate: Gate, metrics: GroupCommits) -> Result<Writer, StoreError> {
        let conn = open_writer(path, cache_mib)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let log = CommitLog::new(metrics);
        std::thread::Builder::new()
            .name("herald-sqlite-writer".into())
            .spawn(move || run(conn, rx, &gate, log))
            .map_err(|e| StoreError::Internal(format!("spawning the writer thread: {e}")))?;
        Ok(Writer { queue: tx })
    }

    /// Stores `batch` in the next group commit; durable when it answers.
    pub async fn append(&self, batch: Vec<NewNotification>) -> Result<Vec<Appended>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Request::Append(batch, reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| StoreError::Unavailable("the store closed before committing".into()))?
    }

    /// Runs `sql` (a `DELETE`) with `params` in a transaction of its own,
    /// in turn with the group commits; how many rows it deleted.
    pub async fn delete(&self, sql: &'static str, params: Vec<Value>) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Request::Delete(sql, params, reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| StoreError::Unavailable("the store closed before deleting".into()))?
    }

    pub fn is_stopped(&self) -> bool {
        self.queue.is_closed()
    }

    /// Commits what is queued, then closes the connection.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Request::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// The writer's connection: `synchronous=FULL` (a commit survives power
/// loss), the checkpoint threshold above, and a page cache of `cache_mib`
/// (SQLite's default is 2 MiB; a group commit of random users touches a
/// leaf per notification, and every page not cached is read back first:
/// batched storing ≈57k/s with 2 MiB, ≈61k/s with 64, ≈65k/s with 256,
/// docs/BENCHMARKS.md). The cache fills only as pages are used.
///
/// It goes through [`herald_walbuf`], which hands a commit's WAL frames to
/// the kernel in 64 KiB writes instead of two writes per page (the largest
/// item of the writer's profile; docs/BENCHMARKS.md). That VFS relies on the
/// commit syncing the WAL before publishing it, which `synchronous=FULL` does.
fn open_writer(path: &Path, cache_mib: u32) -> Result<Connection, StoreError> {
    herald_walbuf::register()
        .map_err(|code| StoreError::Internal(format!("registering SQLite's WAL-buffering VFS failed (code {code})")))?;
    let conn = open_with(path, Some(herald_walbuf::NAME))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(store_error)?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES).map_err(store_error)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT).map_err(store_error)?;
    conn.pragma_update(None, "cache_size", -i64::from(cache_mib) * 1024).map_err(store_error)?;
    Ok(conn)
}

fn run(mut conn: Connection, mut queue: mpsc::Receiver<Request>, gate: &Gate, mut log: CommitLog) {
    let mut closing = None;
    while let Some(first) = queue.blocking_recv() {
        let mut group = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        // A request that is not an append ends the group; it runs after it.
        let mut after = None;
        while let Some(request) = next.take() {
            match request {
                Request::Append(batch, reply) => {
                    size += batch.len();
                    group.push((batch, reply));
                }
                other => {
                    after = Some(other);
                    break;
                }
            }
            if size < MAX_GROUP {
                next = queue.try_recv().ok();
            }
        }
        if !group.is_empty() {
            let _turn = gate.blocking_turn();
            commit_group(&mut conn, group, &mut log);
        }
        match after {
            Some(Request::Delete(sql, params, reply)) => {
                let _turn = gate.blocking_turn();
                let deleted = conn.execute(sql, params_from_iter(params)).map(|n| n as u64).map_err(store_error);
                let _ = reply.send(deleted);
            }
            Some(Request::Close(done)) => {
                closing = Some(done);
                break;
            }
            Some(Request::Append(..)) | None => {}
        }
    }
    drop(conn);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

fn commit_group(conn: &mut Connection, group: Vec<(Vec<NewNotification>, AppendReply)>, log: &mut CommitLog) {
    let (batches, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
    let notifications = batches.iter().map(Vec::len).sum();
    let began = Instant::now();
    let result = (|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(store_error)?;
        let last_seqs = counters(&tx, &batches).map_err(store_error)?;
        let earlier = earlier_keys(&tx, &batches).map_err(store_error)?;
        let plan = Plan::new(&batches, last_seqs, earlier)?;
        write(&tx, &plan).map_err(store_error)?;
        tx.commit().map_err(store_error)?;
        Ok::<_, StoreError>(plan.outcomes)
    })();
    // A failed transaction rolls back when it is dropped: nothing of the group is stored.
    match result {
        Ok(outcomes) => {
            log.committed(notifications, began.elapsed());
            for (reply, out) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(err) => {
            log.failed(&err, notifications);
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// The group's users' `last_seq` (0 for a user never seen). The writer holds
/// SQLite's write lock from `BEGIN IMMEDIATE`, so no one else moves them.
fn counters(conn: &Connection, batches: &[Vec<NewNotification>]) -> rusqlite::Result<HashMap<String, i64>> {
    let mut statement = conn.prepare_cached("SELECT last_seq FROM users WHERE user_id = ?")?;
    let mut last_seqs = HashMap::new();
    for n in batches.iter().flatten() {
        if !last_seqs.contains_key(&*n.user_id) {
            let last: Option<i64> = statement.query_row([&*n.user_id], |r| r.get(0)).optional()?;
            last_seqs.insert(n.user_id.to_string(), last.unwrap_or(0));
        }
    }
    Ok(last_seqs)
}

/// The stored notifications whose (user, idempotency key) the group repeats.
fn earlier_keys(
    conn: &Connection,
    batches: &[Vec<NewNotification>],
) -> rusqlite::Result<HashMap<Key, StoredNotification>> {
    let mut earlier = HashMap::new();
    let mut keyed = batches.iter().flatten().filter_map(|n| Some((&n.user_id, n.idempotency_key.as_ref()?))).peekable();
    if keyed.peek().is_none() {
        return Ok(earlier);
    }
    let mut statement = conn.prepare_cached(concat!(
        "SELECT seq, id, topic, payload, created_at, read FROM notifications",
        " WHERE user_id = ? AND idempotency_key = ?"
    ))?;
    let mut columns = NotificationColumns::default();
    for (user, key) in keyed {
        let mut rows = statement.query((&**user, &**key))?;
        if let Some(row) = rows.next()? {
            earlier.insert((user.clone(), key.clone()), columns.decode(user, row)?);
        }
    }
    Ok(earlier)
}

/// Inserts the new notifications and writes the counters back.
fn write(conn: &Connection, plan: &Plan<'_>) -> rusqlite::Result<()> {
    let rows = &plan.rows;
    let mut insert = conn.prepare_cached(
        "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at, idempotency_key)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )?;
    for i in 0..rows.users.len() {
        insert.execute((
            rows.users[i],
            rows.seqs[i],
            rows.ids[i],
            rows.topics[i],
            rows.payloads[i],
            rows.created[i],
            rows.keys[i],
        ))?;
    }
    let mut counter = conn.prepare_cached(
        "INSERT INTO users (user_id, last_seq) VALUES (?, ?)
         ON CONFLICT (user_id) DO UPDATE SET last_seq = excluded.last_seq",
    )?;
    for (user, last) in &plan.counters {
        counter.execute((user, last))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_connection_takes_its_settings_and_the_wal_buffering_vfs() {
        let dir = std::env::temp_dir().join(format!("herald-writer-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("herald.db");
        drop(Connection::open(&path).unwrap()); // the store creates the file before its threads start
        for mib in [1, 64, 300] {
            let conn = open_writer(&path, mib).unwrap();
            let kib: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0)).unwrap();
            assert_eq!(kib, -i64::from(mib) * 1024);
            let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
            assert_eq!(sync, 2, "synchronous=FULL (the WAL-buffering VFS relies on it)");
        }
        // Its commits go through the WAL-buffering VFS.
        let conn = open_writer(&path, 1).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        let (writes, _) = herald_walbuf::wal_writes();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        assert!(herald_walbuf::wal_writes().0 > writes, "the writer's WAL writes went through herald_walbuf");
        std::fs::remove_dir_all(dir).ok();
    }
}
