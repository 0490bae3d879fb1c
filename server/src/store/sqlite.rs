//! The embedded default store: one SQLite file in WAL mode.
//!
//! Appends go through one writer thread that owns one connection and commits
//! whatever has queued up in a single transaction (group commit, [`writer`]);
//! `synchronous=FULL`, so a commit survives power loss, and through the
//! `herald_walbuf` VFS, so its WAL frames reach the kernel in a few large
//! writes. Retention and erasure delete on the writer too, between groups.
//! Reads of notifications run on reader threads of their own ([`reader`]);
//! the rest (unread counts, read marks, jobs, revocations, migrations) use a
//! small sqlx pool, whose writes take turns at SQLite's write lock with the
//! writer thread (`writer::Gate`). WAL lets the readers run beside the writer.

/// The user `?1`'s read floor (migration 0009; 0 for a user without a
/// counter row): every notification of theirs at or below it is read, so
/// the statements that look for unread ones start above it.
macro_rules! read_floor_of_user_1 {
    () => {
        "(SELECT COALESCE(MAX(read_floor), 0) FROM users WHERE user_id = ?1)"
    };
}

mod backup;
mod jobs;
mod reader;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{ReadMark, Seq};
use rusqlite::types::Value;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Sqlite, SqlitePool};
use tokio::sync::OwnedMutexGuard;

use super::{
    Appended, Head, ListQuery, NewNotification, Revocation, Revocations, Store, StoreError, StoreOptions,
    StoredNotification, TokenRevocation, Unread,
};

pub use backup::{Backup, Restore};

pub struct SqliteStore {
    pool: SqlitePool,
    writer: writer::Writer,
    readers: reader::Readers,
    /// Turns at the write lock with the writer thread ([`writer::Gate`]).
    gate: writer::Gate,
}

impl SqliteStore {
    /// A failed statement's error (the job store's statements go through
    /// this; PostgreSQL notes read-only refusals there).
    fn db_error(&self, error: sqlx::Error) -> StoreError {
        error.into()
    }

    /// A pool connection to write on, and the turn to write with it: the
    /// writer thread waits while the turn is held, so hold it for one
    /// statement or transaction only. The connection comes first, so no
    /// turn is held while the pool is exhausted. Every write on the pool
    /// goes through this (the job and epoch stores' too).
    async fn for_writing(&self) -> Result<(PoolConnection<Sqlite>, OwnedMutexGuard<()>), StoreError> {
        let conn = self.pool.acquire().await?;
        Ok((conn, self.gate.turn().await))
    }

    /// Opens (creating if missing) and migrates the database, then starts the
    /// writer and reader threads. Several processes opening one new file at once can see
    /// `SQLITE_BUSY` before any busy handler applies (the switch to WAL, a
    /// migration recorded twice), so opening is retried for a few seconds.
    pub async fn open(url: &str, store: &StoreOptions) -> Result<SqliteStore, StoreError> {
        let (pool_size, cache_mib) = (store.pool_size, store.sqlite_cache_mib);
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("bad database url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .pragma("wal_autocheckpoint", writer::CHECKPOINT_PAGES.to_string())
            .log_statements(tracing::log::LevelFilter::Trace);
        let mut attempt = 0;
        let pool = loop {
            attempt += 1;
            match open_once(&options, pool_size).await {
                Ok(opened) => break opened,
                Err(e) if attempt < 8 => {
                    tracing::debug!(error = %e, attempt, "opening the SQLite store again");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let gate = writer::Gate::default();
        let threads = async {
            let file = database_file(&pool).await?;
            Ok((
                writer::Writer::start(&file, cache_mib, gate.clone(), store.group_commits.clone())?,
                reader::Readers::start(file, pool_size as usize)?,
            ))
        };
        match threads.await {
            Ok((writer, readers)) => Ok(SqliteStore { pool, writer, readers, gate }),
            Err(e) => {
                pool.close().await;
                Err(e)
            }
        }
    }

    /// [`Store::mark_read`] up to `up_to`, a chunk per transaction.
    async fn mark_read_up_to(&self, user: &str, up_to: Seq) -> Result<Vec<Seq>, StoreError> {
        let newest = self.readers.last_seqs(&[user.into()]).await?.first().copied().unwrap_or(0);
        let mut marked = Vec::new();
        loop {
            let chunk = sqlx::query_scalar(MARK_UP_TO_CHUNK_SQL).bind(user).bind(up_to.min(newest)).bind(MARK_CHUNK);
            let mut done = self.mark_in_turn(user, chunk).await?;
            done.sort_unstable();
            let last = (done.len() as i64) < MARK_CHUNK;
            marked.append(&mut done);
            if last {
                return Ok(marked);
            }
        }
    }

    /// Runs one marking statement (`UPDATE … RETURNING seq`), in turn with
    /// the other writes; then, if it marked anything, raises the user's read
    /// floor and deletes their counters left at 0. The seqs it marked.
    ///
    /// Each statement commits alone: losing the last two to a crash leaves
    /// a floor lower than it could be and a counter row at 0, both harmless.
    /// No explicit transaction around them: one whose `UPDATE … RETURNING`
    /// failed on a full disk was seen to leave its pooled connection holding
    /// SQLite's write lock (its rollback never took), so every later write
    /// of the node timed out (`tests/binary.rs`, the full-disk test, in two
    /// runs of three).
    async fn mark_in_turn<'q>(
        &self,
        user: &'q str,
        marking: sqlx::query::QueryScalar<'q, Sqlite, Seq, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> Result<Vec<Seq>, StoreError> {
        let (mut conn, _turn) = self.for_writing().await?;
        let marked: Vec<Seq> = marking.fetch_all(&mut *conn).await?;
        if !marked.is_empty() {
            sqlx::query(RAISE_READ_FLOOR_SQL).bind(user).execute(&mut *conn).await?;
            sqlx::query(DROP_ZERO_COUNTERS_SQL).bind(user).execute(&mut *conn).await?;
        }
        Ok(marked)
    }

    /// Runs a chunked `DELETE` (`sql`, bound to `params` then the chunk
    /// size) on the writer until a chunk comes back short; how many rows
    /// went. Publishes queued meanwhile commit between two chunks.
    async fn delete_in_chunks(&self, sql: &'static str, params: Vec<Value>) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let mut bound = params.clone();
            bound.push(Value::Integer(super::DELETE_CHUNK));
            let deleted = self.writer.delete(sql, bound).await?;
            total += deleted;
            if deleted < super::DELETE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}

async fn open_once(options: &SqliteConnectOptions, pool_size: u32) -> Result<SqlitePool, StoreError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await?;
    if let Err(e) = super::migrator(sqlx::migrate!("../migrations/sqlite")).run(&pool).await {
        pool.close().await;
        return Err(StoreError::Internal(format!("migrations failed: {e}")));
    }
    Ok(pool)
}

/// The path of the file the pool opened, for the writer and reader threads to open too.
async fn database_file(pool: &SqlitePool) -> Result<std::path::PathBuf, StoreError> {
    let file: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'").fetch_one(pool).await?;
    if file.is_empty() {
        return Err(StoreError::Internal("the SQLite database has no file".into()));
    }
    Ok(file.into())
}

/// `herald backup`: copies the database named by `url` into the new file
/// `to`, a consistent snapshot taken beside a running node ([`backup`]).
pub async fn backup(url: &str, to: &std::path::Path) -> Result<Backup, StoreError> {
    let (source, to) = (file_of(url)?, to.to_path_buf());
    off_runtime(move || backup::backup(&source, &to)).await
}

/// `herald restore`: puts the backup `from` in place of the database named
/// by `url`, whose node is stopped ([`backup::restore`]). The caller marks
/// the store restored.
pub async fn restore(url: &str, from: &std::path::Path) -> Result<Restore, StoreError> {
    let (database, from) = (file_of(url)?, from.to_path_buf());
    off_runtime(move || backup::restore(&from, &database)).await
}

/// `herald check`: [`backup::inspect`] on the database named by `url`,
/// read-only, whether a node runs on it or not; `(users, notifications)`.
pub async fn check(url: &str) -> Result<(i64, i64), StoreError> {
    let file = file_of(url)?;
    if !file.is_file() {
        return Err(StoreError::Internal(format!("there is no database at {}", file.display())));
    }
    off_runtime(move || backup::inspect(&file)).await
}

/// The file a `sqlite://` URL names.
fn file_of(url: &str) -> Result<std::path::PathBuf, StoreError> {
    let options =
        SqliteConnectOptions::from_str(url).map_err(|e| StoreError::Internal(format!("bad database url: {e}")))?;
    Ok(options.get_filename().to_path_buf())
}

/// Whether a SQLite result code (primary or extended) means "not now"
/// rather than "never". The statement or transaction it ended rolled back,
/// so nothing of it was written, and the same work succeeds later:
/// another writer holds the lock (`BUSY`, `LOCKED`), the file cannot be
/// opened (`CANTOPEN`), the disk is full (`FULL`: `ENOSPC`), or the
/// operating system refused a read, write or sync (`IOERR`: a disk quota
/// (`EDQUOT`), a file system remounted read-only, a failing device). An
/// operator makes room or mends the disk, and writes resume without a
/// restart. Anything else (a constraint, corruption, misuse) is a bug or
/// damage. The PostgreSQL store's counterpart is `postgres::is_unavailable`.
pub(super) fn is_unavailable(code: std::ffi::c_int) -> bool {
    use rusqlite::ffi;
    matches!(
        code & 0xff,
        ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED | ffi::SQLITE_CANTOPEN | ffi::SQLITE_FULL | ffi::SQLITE_IOERR
    )
}

/// [`is_unavailable`] for an error from sqlx's SQLite driver, which reports
/// the extended result code. Errors of other databases: `false`.
pub(super) fn is_unavailable_error(error: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    use sqlx::error::DatabaseError as _;
    error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some_and(|e| e.code().and_then(|code| code.parse().ok()).is_some_and(is_unavailable))
}

/// Runs blocking file work on a thread of its own.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| StoreError::Internal(format!("the file thread failed: {e}")))?
}

/// A user's unread counts by topic, from the counters the triggers of
/// migration 0009 keep (never a count over the notifications).
pub const UNREAD_SQL: &str = "SELECT topic, n FROM unread_counts WHERE user_id = ? AND n > 0 ORDER BY topic";

/// Most notifications one transaction of a "mark everything read" marks
/// (≈4 ms of the write lock with the counters' triggers).
const MARK_CHUNK: i64 = 1000;

/// Marks read the user `?1`'s first `?3` unread notifications above their
/// read floor, up to seq `?2`.
const MARK_UP_TO_CHUNK_SQL: &str = concat!(
    "UPDATE notifications SET read = 1 WHERE user_id = ?1 AND seq IN (",
    "SELECT seq FROM notifications WHERE user_id = ?1 AND read = 0 AND seq > ",
    read_floor_of_user_1!(),
    " AND seq <= ?2 ORDER BY seq LIMIT ?3) RETURNING seq"
);

/// Deletes the user's unread counters that stand at 0, after a read mark
/// or an erasure (the triggers leave them, so that the next notification
/// of a topic updates a row in place): a user who reads everything keeps
/// no counter rows, and an erased one keeps no topic names.
const DROP_ZERO_COUNTERS_SQL: &str = "DELETE FROM unread_counts WHERE user_id = ? AND n = 0";

/// Raises the user's `read_floor` to just below their first unread
/// notification above it (to their `last_seq` when none is unread).
const RAISE_READ_FLOOR_SQL: &str = "UPDATE users SET read_floor = COALESCE(
        (SELECT seq - 1 FROM notifications
          WHERE user_id = users.user_id AND seq > users.read_floor AND read = 0 ORDER BY seq LIMIT 1),
        last_seq)
     WHERE user_id = ?";

super::epochs::impl_epoch_store!(SqliteStore);

#[async_trait]
impl Store for SqliteStore {
    fn pool_usage(&self) -> (u32, u32) {
        let idle = self.pool.num_idle() as u32;
        (self.pool.size().saturating_sub(idle), idle)
    }

    async fn append(&self, batch: Vec<NewNotification>) -> Result<Vec<Appended>, StoreError> {
        self.writer.append(batch).await
    }

    async fn head(&self, user: &str) -> Result<Head, StoreError> {
        self.readers.head(user).await
    }

    async fn resume(
        &self,
        user: &str,
        since: Option<Seq>,
        limit: u32,
    ) -> Result<(Head, Vec<StoredNotification>), StoreError> {
        self.readers.resume(user, since, limit).await
    }

    async fn last_seqs(&self, users: &[Arc<str>]) -> Result<Vec<Seq>, StoreError> {
        self.readers.last_seqs(users).await
    }

    async fn after(
        &self,
        user: &str,
        after: Seq,
        up_to: Option<Seq>,
        limit: u32,
    ) -> Result<Vec<StoredNotification>, StoreError> {
        self.readers.after(user, after, up_to.unwrap_or(Seq::MAX), limit).await
    }

    async fn list(&self, user: &str, q: &ListQuery) -> Result<Vec<StoredNotification>, StoreError> {
        self.readers.list(user, q).await
    }

    /// Read marks look for unread notifications above the user's
    /// `read_floor` only (below it everything is read; migration 0009), then
    /// raise the floor to just below the first notification still unread.
    /// The floor's walk starts where the last one stopped, so over time it
    /// passes each notification once. Triggers move the unread counters;
    /// those left at 0 are deleted.
    ///
    /// "Mark everything read up to N" goes [`MARK_CHUNK`] notifications per
    /// transaction, each taking its own turn at the write lock, so that
    /// publishes wait for a chunk rather than for a long unread backlog (a
    /// trigger per row makes 100,000 take ≈0.4 s; docs/BENCHMARKS.md). It
    /// stops at the newest seq committed when it began. Cut short by an
    /// error, it has marked a prefix; repeating it finishes the job, and the
    /// sessions, told the mark as given, hear of it once it succeeds. Marks
    /// by seqs (at most 1,000) and by topic take one transaction: a topic
    /// mark is told to the sessions as the seqs it changed, which a mark cut
    /// short would lose.
    async fn mark_read(&self, user: &str, mark: &ReadMark) -> Result<Vec<Seq>, StoreError> {
        let query = match mark {
            ReadMark::Seqs { seqs } => {
                let list = serde_json::to_string(seqs).map_err(|e| StoreError::Internal(e.to_string()))?;
                sqlx::query_scalar(
                    "UPDATE notifications SET read = 1
                     WHERE user_id = ? AND read = 0 AND seq IN (SELECT value FROM json_each(?)) RETURNING seq",
                )
                .bind(user)
                .bind(list)
            }
            ReadMark::UpTo { up_to_seq } => return self.mark_read_up_to(user, *up_to_seq).await,
            ReadMark::Topic { topic, up_to_seq } => sqlx::query_scalar(concat!(
                "UPDATE notifications SET read = 1 WHERE user_id = ?1 AND read = 0 AND topic = ?2",
                " AND seq > ",
                read_floor_of_user_1!(),
                " AND seq <= ?3",
                " RETURNING seq",
            ))
            .bind(user)
            .bind(topic.as_str())
            .bind(up_to_seq.unwrap_or(Seq::MAX)),
        };
        let mut marked = self.mark_in_turn(user, query).await?;
        marked.sort_unstable();
        Ok(marked)
    }

    /// The user's unread counters (migration 0009): a row per topic.
    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        let found: Vec<(String, i64)> = sqlx::query_as(UNREAD_SQL).bind(user).fetch_all(&self.pool).await?;
        Ok(Unread { total: found.iter().map(|(_, n)| n).sum(), by_topic: found })
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.delete_in_chunks(super::PURGE_CHUNK_SQL, vec![Value::Integer(before_ms)]).await
    }

    /// The user's unread counters that the erasure brought to 0 go too,
    /// with the topics they name.
    async fn erase(&self, user: &str, up_to: Seq) -> Result<u64, StoreError> {
        let erased = self
            .delete_in_chunks(super::ERASE_CHUNK_SQL, vec![Value::Text(user.into()), Value::Integer(up_to)])
            .await?;
        self.writer.delete(DROP_ZERO_COUNTERS_SQL, vec![Value::Text(user.into())]).await?;
        Ok(erased)
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<Revocation, StoreError> {
        let (mut conn, _turn) = self.for_writing().await?;
        // `fetch_all`: a `RETURNING` statement read with `fetch_one` would
        // commit at sqlx's statement reset, which drops a failed commit's
        // error (see `jobs::sql::claim`): a revocation not stored would be
        // answered as in force.
        let in_force: Vec<Revocation> = sqlx::query_as(super::REVOKE_SQL)
            .bind(&revocation.user_id)
            .bind(revocation.issued_before)
            .bind(revocation.expires_at)
            .bind(super::now_ms())
            .fetch_all(&mut *conn)
            .await?;
        in_force.into_iter().next().ok_or_else(|| StoreError::Internal("the revocation returned no row".into()))
    }

    async fn revoke_token(&self, revocation: &TokenRevocation) -> Result<TokenRevocation, StoreError> {
        let (mut conn, _turn) = self.for_writing().await?;
        // `fetch_all`, as in `revoke`.
        let in_force: Vec<TokenRevocation> = sqlx::query_as(super::REVOKE_TOKEN_SQL)
            .bind(&revocation.user_id)
            .bind(&revocation.jti)
            .bind(revocation.expires_at)
            .bind(super::now_ms())
            .fetch_all(&mut *conn)
            .await?;
        in_force.into_iter().next().ok_or_else(|| StoreError::Internal("the revocation returned no row".into()))
    }

    async fn purge_revocations(&self, now_secs: i64) -> Result<u64, StoreError> {
        let (mut conn, _turn) = self.for_writing().await?;
        let users = sqlx::query(super::PURGE_REVOCATIONS_SQL).bind(now_secs).execute(&mut *conn).await?;
        let tokens = sqlx::query(super::PURGE_TOKEN_REVOCATIONS_SQL).bind(now_secs).execute(&mut *conn).await?;
        Ok(users.rows_affected() + tokens.rows_affected())
    }

    async fn revocations(&self, since_ms: Option<i64>) -> Result<Revocations, StoreError> {
        let as_of_ms = super::now_ms();
        let since_ms = since_ms.unwrap_or(i64::MIN);
        let changed = sqlx::query_as(super::REVOCATIONS_SQL).bind(since_ms).fetch_all(&self.pool).await?;
        let tokens = sqlx::query_as(super::TOKEN_REVOCATIONS_SQL).bind(since_ms).fetch_all(&self.pool).await?;
        Ok(Revocations { changed, tokens, as_of_ms })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.is_stopped() {
            return Err(StoreError::Unavailable("the writer has stopped".into()));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.readers.close().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::value::RawValue;

    use super::*;

    fn note(user: &str) -> NewNotification {
        NewNotification {
            user_id: user.into(),
            id: uuid::Uuid::now_v7().to_string(),
            topic: "t".into(),
            payload: RawValue::from_string("{}".into()).unwrap().into(),
            created_at_ms: super::super::now_ms(),
            idempotency_key: None,
        }
    }

    /// "Not now" is the disk (full, a quota, read-only, failing) or the
    /// lock, with any extended code; a constraint, corruption or a malformed
    /// statement is not. A full disk end to end: `tests/binary.rs`.
    #[test]
    fn what_sqlite_errors_are_worth_retrying() {
        use rusqlite::ffi;
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_BUSY_SNAPSHOT,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_CANTOPEN,
        ] {
            assert!(is_unavailable(code), "{code}");
        }
        for code in [ffi::SQLITE_CONSTRAINT_PRIMARYKEY, ffi::SQLITE_CORRUPT, ffi::SQLITE_ERROR, ffi::SQLITE_MISUSE] {
            assert!(!is_unavailable(code), "{code}");
        }
    }

    /// The writer thread takes its turn at the write lock like the pool's
    /// writes do: while another holds the turn, a publish waits (it would
    /// otherwise starve them under a steady load; see writer.rs), and it
    /// commits once the turn is given back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_waits_for_a_write_turn_held_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/herald.db", dir.path().display());
        let store = Arc::new(SqliteStore::open(&url, &StoreOptions::default()).await.unwrap());
        store.append(vec![note("ann")]).await.unwrap();

        let (conn, turn) = store.for_writing().await.unwrap();
        let mut waiting = tokio::spawn({
            let store = store.clone();
            async move { store.append(vec![note("ann")]).await }
        });
        let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(early.is_err(), "a publish committed while another write held the turn");
        drop((turn, conn));
        let appended = waiting.await.unwrap().unwrap();
        assert_eq!(appended[0].notification.seq, 2);
        store.close().await;
    }
}
