//! PostgreSQL: the production store, shared by every node.
//!
//! **Seqs.** Each user has a counter row in `users`. An append transaction
//! first upserts the counter rows of all its users in sorted order with
//! `ON CONFLICT … DO UPDATE`, which locks them until COMMIT; only then does
//! it read `last_seq`, check idempotency keys, insert the notifications with
//! the next seqs and write the counters back. Any other transaction for the
//! same user — from this node or another — waits on that row lock and then
//! reads the committed counter (READ COMMITTED re-reads the newest row
//! version for `ON CONFLICT DO UPDATE`). So a user's seqs are handed out by
//! one transaction at a time: gapless (a rolled-back transaction never
//! advanced the counter) and in commit order (a later seq cannot commit
//! before the transaction holding the lock). Sorted locking keeps concurrent
//! groups from deadlocking; deadlock and serialization failures are retried.
//! Seqs never come from a sequence or `bigserial`.
//!
//! **Group commit** ([`writer`]): `append` queues its batch on one bounded
//! queue; a few writer tasks each take everything queued (up to a cap) and
//! commit it in one transaction of at most five statements whatever its
//! size — multi-row `UNNEST` statements, never a statement per row. The group
//! succeeds or fails as a whole; every request gets its own answer, and an
//! unknown outcome (connection lost during COMMIT, deadline passed) is an
//! error, never `Ok`.
//!
//! **Batched replay reads** ([`reader`]): `resume` (a reconnecting
//! session's head and first page, from one statement; `head` is a resume
//! without a page) and `after` are gathered by one task into batches that run as one query each
//! (`= ANY`, `UNNEST … LATERAL`), a few batches at a time, so a reconnect
//! storm costs a handful of queries.
//!
//! Connection failures, timeouts and PostgreSQL's "not now" errors map to
//! [`StoreError::Unavailable`] (see [`is_unavailable`]); every database call
//! is bounded by the statement timeout on the server and by a deadline here.
//!
//! **A read-only server** (the URL reaches a standby, or a primary being
//! failed over) refuses writes with 25006. Whoever meets that — a writer,
//! a read mark, a delete, a job-store or revocation statement, the
//! readiness probe — notes it in [`ReadOnlySeen`], and the pool closes
//! every connection opened before, rather than hand it out again: the next
//! ones connect anew and reach the new primary as soon as DNS or the proxy
//! points there.

mod jobs;
mod reader;
mod writer;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use herald_protocol::{ReadMark, Seq};
use serde_json::value::RawValue;
use sqlx::error::DatabaseError;
use sqlx::migrate::MigrateError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgDatabaseError, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Appended, Head, ListQuery, NewNotification, Revocation, Revocations, SharedTopic, Store, StoreError, StoreOptions,
    StoredNotification, TokenRevocation, Unread,
};

/// `SELECT <the columns [`Columns`] reads> FROM notifications <rest>`.
macro_rules! select {
    ($rest:literal) => {
        concat!("SELECT seq, id, topic, payload, created_at, read FROM notifications ", $rest)
    };
}

/// Opens the PostgreSQL store and runs `migrations/postgres`.
pub async fn open(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(PostgresStore::open(url, options).await?))
}

/// A cheap handle on the pool and the writer and reader tasks; see the module doc.
pub struct PostgresStore {
    pool: PgPool,
    read_only: ReadOnlySeen,
    writes: mpsc::Sender<writer::Request>,
    reads: mpsc::Sender<reader::Request>,
    closing: CancellationToken,
    tasks: TaskTracker,
}

impl PostgresStore {
    pub async fn open(url: &str, options: &StoreOptions) -> Result<PostgresStore, StoreError> {
        let base = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("bad database url: {e}")))?
            .application_name("herald");
        migrate(base.clone(), options.connect_timeout).await?;
        let statement_ms = options.statement_timeout.as_millis().max(1);
        let read_only = ReadOnlySeen::new();
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(options.connect_timeout)
            .test_before_acquire(true)
            .before_acquire({
                let read_only = read_only.clone();
                move |_, meta| {
                    let keep = !read_only.opened_before(meta.age);
                    Box::pin(async move { Ok(keep) })
                }
            })
            .connect_with(base.options([("statement_timeout", format!("{statement_ms}ms"))]))
            .await?;

        // Longest any one group or batch may take before its caller gets an
        // error: waiting for a connection, then a few statements.
        let deadline = options.connect_timeout + 2 * options.statement_timeout + Duration::from_secs(1);
        let closing = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (writes, queue) = mpsc::channel(writer::QUEUE);
        let writer_tasks = (options.pool_size / 2).clamp(1, 4);
        let hold = options.pool_size >= 2 * writer_tasks;
        let writers = writer::Writers::new(
            pool.clone(),
            read_only.clone(),
            queue,
            closing.clone(),
            deadline,
            hold,
            options.group_commits.clone(),
        );
        for _ in 0..writer_tasks {
            tasks.spawn(writers.clone().run());
        }
        let (reads, queue) = mpsc::channel(reader::QUEUE);
        let in_flight = (options.pool_size as usize / 4).clamp(1, 4);
        tasks.spawn(reader::run(pool.clone(), queue, closing.clone(), in_flight, deadline));
        tasks.close();
        Ok(PostgresStore { pool, read_only, writes, reads, closing, tasks })
    }

    async fn read<T>(
        &self,
        request: reader::Request,
        answer: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.reads.send(request).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// A failed statement's error; a read-only refusal is noted first. The
    /// job store's statements (`impl_job_store!`) go through this.
    fn db_error(&self, error: sqlx::Error) -> StoreError {
        self.read_only.error(error)
    }

    /// A pool connection to write on (the shared job and epoch stores ask
    /// SQLite for a turn at its write lock this way; PostgreSQL's row locks
    /// need none).
    async fn for_writing(&self) -> Result<(PoolConnection<Postgres>, ()), StoreError> {
        Ok((self.pool.acquire().await.map_err(|e| self.db_error(e))?, ()))
    }

    /// The database's clock, unix ms: the same for every node.
    async fn clock_ms(&self) -> Result<i64, StoreError> {
        let query = sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint");
        Ok(query.fetch_one(&self.pool).await?)
    }
}

/// `herald check` on PostgreSQL: no notification beyond its user's counter
/// (PostgreSQL checks its own pages; `amcheck` is its tool for indexes);
/// `(users, notifications)`. Reads one snapshot, beside running nodes.
pub async fn check(url: &str, connect_timeout: Duration) -> Result<(i64, i64), StoreError> {
    let connect = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Internal(format!("bad database url: {e}")))?
        .application_name("herald check");
    let pool = PgPoolOptions::new().max_connections(1).acquire_timeout(connect_timeout).connect_with(connect).await?;
    let counted = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let beyond: i64 = sqlx::query_scalar(super::BEYOND_COUNTER_SQL).fetch_one(&mut *tx).await?;
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&mut *tx).await?;
        let notifications: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notifications").fetch_one(&mut *tx).await?;
        Ok::<_, sqlx::Error>((beyond, users, notifications))
    }
    .await;
    pool.close().await;
    let (beyond, users, notifications) = counted?;
    if beyond != 0 {
        return Err(StoreError::Internal(format!("{beyond} notifications are beyond their user's counter")));
    }
    Ok((users, notifications))
}

/// Runs the migrations on a connection of their own, with no statement
/// timeout (an index built on a big table may take long). sqlx holds an
/// advisory lock on the database meanwhile, so nodes starting together
/// apply each migration once.
async fn migrate(connect: PgConnectOptions, connect_timeout: Duration) -> Result<(), StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connect_timeout)
        .connect_with(connect.options([("statement_timeout", "0")]))
        .await?;
    let result = super::migrator(sqlx::migrate!("../migrations/postgres")).run(&pool).await;
    pool.close().await;
    result.map_err(|e| match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => StoreError::from(e),
        other => StoreError::Internal(format!("migrations failed: {other}")),
    })
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// Whether a PostgreSQL error means "not now" rather than "never": the
/// server is shutting down or starting, the connection broke, it is out of
/// connections or resources, a statement timed out, or a transaction lost a
/// deadlock or serialization conflict. Errors of other databases: `false`.
pub(super) fn is_unavailable(error: &(dyn DatabaseError + 'static)) -> bool {
    let Some(error) = error.try_downcast_ref::<PgDatabaseError>() else { return false };
    let code = error.code();
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources, incl. 53300 too_many_connections
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
                | "57014" // query_canceled: statement_timeout
                | "55P03" // lock_not_available
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | READ_ONLY
        )
}

/// `read_only_sql_transaction`: a write on a standby, or on a primary made
/// read-only while it is failed over. Nothing was written; it is a matter
/// of time (the pool's next connection may reach the new primary).
pub(super) const READ_ONLY: &str = "25006";

/// Whether `error` is [`READ_ONLY`].
pub(super) fn is_read_only(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some(READ_ONLY))
}

/// When this store last met a read-only server: the pool hands out no
/// connection opened before then (see the module doc). A cheap handle.
#[derive(Clone)]
pub(super) struct ReadOnlySeen {
    epoch: Instant,
    /// Microseconds from `epoch` to the last sighting, plus one; 0: never.
    at: Arc<AtomicU64>,
}

impl ReadOnlySeen {
    fn new() -> ReadOnlySeen {
        ReadOnlySeen { epoch: Instant::now(), at: Arc::new(AtomicU64::new(0)) }
    }

    pub(super) fn note(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.at.fetch_max(now + 1, Ordering::Relaxed);
    }

    /// Whether a connection `age` old was opened at or before the last sighting.
    fn opened_before(&self, age: Duration) -> bool {
        match self.at.load(Ordering::Relaxed) {
            0 => false,
            at => self.epoch.elapsed().saturating_sub(age) <= Duration::from_micros(at - 1),
        }
    }

    /// `error` as a [`StoreError`], noted first when it is [`READ_ONLY`].
    pub(super) fn error(&self, error: sqlx::Error) -> StoreError {
        if is_read_only(&error) {
            self.note();
        }
        error.into()
    }
}

/// Runs the chunked `DELETE` that `query` builds (bound up to the chunk
/// size, which comes last) until a chunk comes back short; how many rows
/// went. Each chunk is a statement of its own: no lock is held long.
async fn delete_in_chunks<'q>(
    pool: &PgPool,
    read_only: &ReadOnlySeen,
    query: impl Fn() -> Query<'q, Postgres, PgArguments>,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let deleted =
            query().bind(super::DELETE_CHUNK).execute(pool).await.map_err(|e| read_only.error(e))?.rows_affected();
        total += deleted;
        if deleted < super::DELETE_CHUNK as u64 {
            return Ok(total);
        }
    }
}

/// Decodes the notification columns (`seq, id, topic, payload, created_at,
/// read`, in that order, from column `first` on) of a statement's rows.
///
/// By position rather than by name (a lookup per column per row); the
/// column types are checked against the decoded types on the first row
/// only (every row of a statement has the same), where sqlx checks them
/// on every value; and consecutive rows with the same topic share its
/// text. A batched replay decodes tens of thousands of rows a second in a
/// reconnect storm (docs/BENCHMARKS.md, "The PostgreSQL replay, leaner").
struct Columns {
    first: usize,
    checked: bool,
    topic: SharedTopic,
}

impl Columns {
    /// The columns of `SELECT seq, id, topic, payload, created_at, read`, from column `first`.
    fn from(first: usize) -> Columns {
        Columns { first, checked: false, topic: SharedTopic::default() }
    }

    fn decode(&mut self, user: &Arc<str>, row: &PgRow) -> Result<StoredNotification, sqlx::Error> {
        let at = self.first;
        if !self.checked {
            row.try_get::<i64, _>(at)?;
            row.try_get::<&str, _>(at + 1)?;
            row.try_get::<&str, _>(at + 2)?;
            row.try_get::<&str, _>(at + 3)?;
            row.try_get::<i64, _>(at + 4)?;
            row.try_get::<bool, _>(at + 5)?;
            self.checked = true;
        }
        let topic = self.topic.of(row.try_get_unchecked(at + 2)?);
        let payload =
            RawValue::from_string(row.try_get_unchecked(at + 3)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        Ok(StoredNotification {
            user_id: user.clone(),
            seq: row.try_get_unchecked(at)?,
            id: row.try_get_unchecked(at + 1)?,
            topic,
            payload: Arc::from(payload),
            created_at_ms: row.try_get_unchecked(at + 4)?,
            read: row.try_get_unchecked(at + 5)?,
        })
    }
}

fn rows(user: &str, rows: Vec<PgRow>) -> Result<Vec<StoredNotification>, StoreError> {
    let user: Arc<str> = user.into();
    let mut columns = Columns::from(0);
    Ok(rows.iter().map(|r| columns.decode(&user, r)).collect::<Result<_, _>>()?)
}

super::epochs::impl_epoch_store!(PostgresStore);

#[async_trait]
impl Store for PostgresStore {
    fn pool_usage(&self) -> (u32, u32) {
        let idle = self.pool.num_idle() as u32;
        (self.pool.size().saturating_sub(idle), idle)
    }

    async fn append(&self, batch: Vec<NewNotification>) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.writes.send(writer::Request { batch, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| StoreError::Unavailable("the store closed before committing".into()))?
    }

    async fn head(&self, user: &str) -> Result<Head, StoreError> {
        Ok(self.resume(user, None, 0).await?.0)
    }

    async fn resume(
        &self,
        user: &str,
        since: Option<Seq>,
        limit: u32,
    ) -> Result<(Head, Vec<StoredNotification>), StoreError> {
        let (reply, answer) = oneshot::channel();
        let query = reader::ResumeQuery { user: user.into(), since, limit };
        self.read(reader::Request::Resume { query, reply }, answer).await
    }

    async fn last_seqs(&self, users: &[Arc<str>]) -> Result<Vec<Seq>, StoreError> {
        let names: Vec<&str> = users.iter().map(|u| &**u).collect();
        let found: Vec<(String, i64)> = sqlx::query_as("SELECT user_id, last_seq FROM users WHERE user_id = ANY($1)")
            .bind(&names)
            .fetch_all(&self.pool)
            .await?;
        let found: std::collections::HashMap<String, i64> = found.into_iter().collect();
        Ok(users.iter().map(|u| found.get(&**u).copied().unwrap_or(0)).collect())
    }

    async fn after(
        &self,
        user: &str,
        after: Seq,
        up_to: Option<Seq>,
        limit: u32,
    ) -> Result<Vec<StoredNotification>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let query = reader::AfterQuery { user: user.into(), after, up_to: up_to.unwrap_or(i64::MAX), limit };
        self.read(reader::Request::After { query, reply }, answer).await
    }

    async fn list(&self, user: &str, q: &ListQuery) -> Result<Vec<StoredNotification>, StoreError> {
        let found = sqlx::query(select!(
            "WHERE user_id = $1 AND seq < $2 AND seq > $3 AND (NOT read OR NOT $4) AND ($6::text IS NULL OR topic = $6)
             ORDER BY seq DESC LIMIT $5"
        ))
        .bind(user)
        .bind(q.before_seq.unwrap_or(i64::MAX))
        .bind(q.after_seq.unwrap_or(0))
        .bind(q.unread_only)
        .bind(i64::from(q.limit))
        .bind(q.topic.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows(user, found)
    }

    async fn mark_read(&self, user: &str, mark: &ReadMark) -> Result<Vec<Seq>, StoreError> {
        let query = match mark {
            ReadMark::Seqs { seqs } => sqlx::query_scalar(
                "UPDATE notifications SET read = true WHERE user_id = $1 AND NOT read AND seq = ANY($2) RETURNING seq",
            )
            .bind(user)
            .bind(seqs),
            ReadMark::UpTo { up_to_seq } => sqlx::query_scalar(
                "UPDATE notifications SET read = true WHERE user_id = $1 AND NOT read AND seq <= $2 RETURNING seq",
            )
            .bind(user)
            .bind(up_to_seq),
            ReadMark::Topic { topic, up_to_seq } => sqlx::query_scalar(
                "UPDATE notifications SET read = true
                 WHERE user_id = $1 AND NOT read AND topic = $2 AND seq <= $3 RETURNING seq",
            )
            .bind(user)
            .bind(topic)
            .bind(up_to_seq.unwrap_or(Seq::MAX)),
        };
        let mut marked: Vec<Seq> = query.fetch_all(&self.pool).await.map_err(|e| self.read_only.error(e))?;
        marked.sort_unstable();
        Ok(marked)
    }

    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        let found: Vec<(String, i64)> = sqlx::query_as(
            "SELECT topic, COUNT(*) FROM notifications WHERE user_id = $1 AND NOT read GROUP BY topic ORDER BY topic",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(Unread { total: found.iter().map(|(_, n)| n).sum(), by_topic: found })
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<Revocation, StoreError> {
        // `updated_ms` on the database's clock, which every node reads the same.
        let now_ms = self.clock_ms().await?;
        let in_force = sqlx::query_as(super::REVOKE_SQL)
            .bind(&revocation.user_id)
            .bind(revocation.issued_before)
            .bind(revocation.expires_at)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_error(e))?;
        Ok(in_force)
    }

    async fn revoke_token(&self, revocation: &TokenRevocation) -> Result<TokenRevocation, StoreError> {
        let now_ms = self.clock_ms().await?;
        let in_force = sqlx::query_as(super::REVOKE_TOKEN_SQL)
            .bind(&revocation.user_id)
            .bind(&revocation.jti)
            .bind(revocation.expires_at)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_error(e))?;
        Ok(in_force)
    }

    async fn purge_revocations(&self, now_secs: i64) -> Result<u64, StoreError> {
        let mut purged = 0;
        for sql in [super::PURGE_REVOCATIONS_SQL, super::PURGE_TOKEN_REVOCATIONS_SQL] {
            let done = sqlx::query(sql).bind(now_secs).execute(&self.pool).await.map_err(|e| self.db_error(e))?;
            purged += done.rows_affected();
        }
        Ok(purged)
    }

    async fn revocations(&self, since_ms: Option<i64>) -> Result<Revocations, StoreError> {
        let as_of_ms = self.clock_ms().await?;
        let since_ms = since_ms.unwrap_or(i64::MIN);
        let changed = sqlx::query_as(super::REVOCATIONS_SQL).bind(since_ms).fetch_all(&self.pool).await?;
        let tokens = sqlx::query_as(super::TOKEN_REVOCATIONS_SQL).bind(since_ms).fetch_all(&self.pool).await?;
        Ok(Revocations { changed, tokens, as_of_ms })
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        delete_in_chunks(&self.pool, &self.read_only, || sqlx::query(super::PURGE_CHUNK_SQL).bind(before_ms)).await
    }

    async fn erase(&self, user: &str, up_to: Seq) -> Result<u64, StoreError> {
        delete_in_chunks(&self.pool, &self.read_only, || sqlx::query(super::ERASE_CHUNK_SQL).bind(user).bind(up_to))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writes.is_closed() {
            return Err(closed());
        }
        // One round trip, as `SELECT 1` would be, that also tells a standby
        // (or a primary being failed over) from a server that takes writes.
        let mut conn = self.pool.acquire().await?;
        let read_only: String = sqlx::query_scalar("SHOW transaction_read_only").fetch_one(&mut *conn).await?;
        if read_only == "on" {
            // Neither this nor any connection opened before it back out of
            // the pool: the next connection may reach a primary.
            conn.close_on_drop();
            self.read_only.note();
            return Err(StoreError::Unavailable(
                "the database is read-only (transaction_read_only = on): a standby, or a primary being failed over"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn close(&self) {
        self.closing.cancel();
        self.tasks.wait().await;
        self.pool.close().await;
    }
}
