//! Durable work: jobs (large-audience publishes) and digest windows.
//!
//! Both live in the store, so any node's workers can take any of them and
//! they survive a node's crash. Whoever works on one holds a **lease** (an
//! owner and an expiry); a worker that dies simply stops renewing it, and
//! after it expires another worker takes the job or window over. Every step
//! a worker takes is idempotent (appends carry idempotency keys), so doing a
//! step twice after a takeover stores nothing twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::value::RawValue;

use super::StoreError;

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Chosen by the caller (UUIDv7).
    pub id: String,
    /// What runs it, e.g. `fanout`.
    pub kind: String,
    /// JSON text the job's kind understands.
    pub payload: String,
    /// Units of work (e.g. users), for progress.
    pub total: i64,
    /// A second enqueue with the same key stores nothing and answers the first job's id.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub payload: String,
    pub state: JobState,
    /// Claims so far (the current one included).
    pub attempts: u32,
    /// Units done, as last recorded by [`JobStore::progress`].
    pub done: i64,
    pub total: i64,
    /// The last failure's reason (kept on retries and on failure).
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// How a worker ends its lease on a job.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Done,
    /// Queued again, due at `at_ms`, with `error` kept as the reason.
    Retry {
        at_ms: i64,
        error: String,
    },
    /// Given up: kept as `failed` with its reason.
    Failed {
        error: String,
    },
}

/// One publish into a digest.
#[derive(Debug, Clone)]
pub struct DigestEntry {
    pub user_id: Arc<str>,
    pub key: Arc<str>,
    pub topic: Arc<str>,
    pub payload: Arc<RawValue>,
    pub at_ms: i64,
    /// The window's length, used when this entry opens a window.
    pub window_ms: i64,
    /// The publish's `idempotency_key`: an entry with a key the user already
    /// has an entry under is not added again.
    pub idempotency_key: Option<Arc<str>>,
}

/// Where a [`DigestEntry`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestAdded {
    pub window_id: String,
    /// Entries in the window so far, this one included (for a repeat: as
    /// the first answer said, the entry's place in its window).
    pub count: i64,
    pub closes_at_ms: i64,
    /// The entry's idempotency key was already used for this user: nothing
    /// was added, and the rest is what the first entry under it was told.
    pub repeated: bool,
}

/// A window to close into one notification.
#[derive(Debug, Clone)]
pub struct DigestWindow {
    pub id: String,
    pub user_id: Arc<str>,
    pub key: String,
    /// The topic of the window's first entry.
    pub topic: Arc<str>,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    pub count: i64,
    /// The first [`DIGEST_ITEMS`] payloads, in order, byte-exact.
    pub items: Vec<Arc<RawValue>>,
    pub closes_at_ms: i64,
}

/// Payloads a digest keeps; later entries are counted only.
pub const DIGEST_ITEMS: i64 = 10;

/// Durable jobs and digest windows. Every store implements it.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a queued job, due now, and returns its id with `true`. When
    /// `idempotency_key` matches an earlier job, stores nothing and returns
    /// that job's id: with `false`, or, when that job had failed, with `true`
    /// after queueing it again (due now, its progress kept, its attempts
    /// counted afresh) — a repeat of a failed publish retries it, and its
    /// notifications' keys keep the users it reached from getting it twice.
    async fn enqueue(&self, job: NewJob) -> Result<(String, bool), StoreError>;

    /// Takes one job that is queued and due, or running with an expired
    /// lease (its worker died): marks it running, held by `owner` until now +
    /// `lease`, and counts an attempt. **No two owners hold a job at once**
    /// (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite: its single writer).
    async fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Job>, StoreError>;

    /// Records progress and extends the lease. `false` when `owner` no longer
    /// holds the job (its lease expired and another took it): stop working on it.
    async fn progress(&self, id: &str, owner: &str, done: i64, lease: Duration) -> Result<bool, StoreError>;

    /// Ends `owner`'s lease with `outcome`; does nothing if `owner` lost it.
    async fn finish(&self, id: &str, owner: &str, outcome: JobOutcome) -> Result<(), StoreError>;

    async fn job(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Adds each entry to the open window of its (user, key), opening one
    /// that closes at `at_ms + window_ms` when none is open or the open one's
    /// time has passed (that one is sealed and closes on its own). Keeps the
    /// first [`DIGEST_ITEMS`] payloads, counts the rest. Atomic per entry
    /// under concurrent adds from any node: no entry is lost or counted twice.
    /// An entry whose `idempotency_key` the user already has an entry under
    /// is not added: its answer is that entry's, marked `repeated`, however
    /// many adds race with the same key (the key's row is written first, so
    /// a second writer waits for the first and then finds it).
    async fn digest_add(&self, entries: Vec<DigestEntry>) -> Result<Vec<DigestAdded>, StoreError>;

    /// Claims up to `limit` windows whose time has passed (`closes_at <=
    /// now_ms`) and that nobody holds: seals them — a later add opens a new
    /// window instead of joining a window being closed — and leases them to
    /// `owner` until now + `lease`.
    async fn digest_claim_due(
        &self,
        owner: &str,
        now_ms: i64,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<DigestWindow>, StoreError>;

    /// Deletes a window whose notification has been appended (with
    /// idempotency key `digest:<window id>`, so a takeover cannot store it twice).
    async fn digest_delete(&self, id: &str) -> Result<(), StoreError>;

    /// When the next open window closes, if any: lets closers sleep until then.
    async fn digest_next_close(&self) -> Result<Option<i64>, StoreError>;

    /// Deletes every window of `user` with its items (erasure); returns how
    /// many windows. A window a closer had already claimed and read may
    /// still be appended as its digest notification. The user's digest
    /// entry keys go too.
    async fn digest_erase(&self, user: &str) -> Result<u64, StoreError>;

    /// Retention for digest entry keys: deletes those whose window closed
    /// before `before_ms` (its digest notification is as old, and goes with
    /// the same retention), `DELETE_CHUNK` rows per statement; returns how many.
    async fn digest_purge_keys(&self, before_ms: i64) -> Result<u64, StoreError>;
}

/// The statements both stores run: `$n` placeholders (SQLite reads them as
/// the n-th argument too), integers for flags, no dialect-only functions.
/// Where the stores differ the caller adds it: PostgreSQL appends
/// [`sql::SKIP_LOCKED`] to the claims' inner selects, SQLite runs each claim
/// as one statement under its single-writer lock.
pub(crate) mod sql {
    pub const ENQUEUE: &str = "INSERT INTO jobs \
        (id, kind, payload, state, attempts, done, total, due_at, idempotency_key, created_at, updated_at) \
        VALUES ($1, $2, $3, 'queued', 0, 0, $4, $5, $6, $5, $5) \
        ON CONFLICT (idempotency_key) DO NOTHING";
    pub const JOB_BY_KEY: &str = "SELECT id FROM jobs WHERE idempotency_key = $1";
    /// `$1` key, `$2` now. Read with `fetch_all` (see [`claim`]).
    pub const REQUEUE_FAILED: &str = "UPDATE jobs SET state = 'queued', due_at = $2, attempts = 0, \
        owner = NULL, lease_until = NULL, updated_at = $2 \
        WHERE idempotency_key = $1 AND state = 'failed' RETURNING id";

    const JOB_COLUMNS: &str = "id, kind, payload, state, attempts, done, total, error, created_at, updated_at";

    /// `$1` owner, `$2` lease until, `$3` now; then the lock clause.
    ///
    /// Read its row with `fetch_all`. On SQLite outside a transaction a
    /// statement with `RETURNING` commits only when it runs to its end;
    /// `fetch_one`/`fetch_optional` stop at the first row and leave the
    /// commit to sqlx's statement reset, which drops its error
    /// (sqlx issue 3430): a claim whose commit failed (the disk full)
    /// would look made, and the job would be worked on unclaimed.
    pub fn claim(lock: &str) -> String {
        format!(
            "UPDATE jobs SET state = 'running', owner = $1, lease_until = $2, attempts = attempts + 1, updated_at = $3 \
             WHERE id = (SELECT id FROM jobs \
                         WHERE (state = 'queued' AND due_at <= $3) OR (state = 'running' AND lease_until <= $3) \
                         ORDER BY due_at, id LIMIT 1 {lock}) \
             RETURNING {JOB_COLUMNS}"
        )
    }

    pub fn job() -> String {
        format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")
    }

    pub const PROGRESS: &str = "UPDATE jobs SET done = $1, lease_until = $2, updated_at = $3 \
        WHERE id = $4 AND owner = $5 AND state = 'running'";

    /// `$1` new state, `$2` due at, `$3` error (NULL keeps the last one), `$4` now.
    pub const FINISH: &str = "UPDATE jobs SET state = $1, due_at = $2, error = COALESCE($3, error), \
        done = CASE WHEN $1 = 'done' THEN total ELSE done END, owner = NULL, lease_until = NULL, updated_at = $4 \
        WHERE id = $5 AND owner = $6 AND state = 'running'";

    /// Seals the open window of (`$1` user, `$2` key) if its time (`$3`) has passed.
    pub const DIGEST_SEAL_EXPIRED: &str = "UPDATE digest_windows SET sealed = 1 \
        WHERE user_id = $1 AND digest_key = $2 AND sealed = 0 AND closes_at <= $3";
    pub const DIGEST_UPSERT: &str = "INSERT INTO digest_windows \
        (id, user_id, digest_key, topic, first_at, last_at, count, closes_at, sealed) \
        VALUES ($1, $2, $3, $4, $5, $5, 1, $6, 0) \
        ON CONFLICT (user_id, digest_key) WHERE sealed = 0 DO UPDATE SET \
          count = digest_windows.count + 1, \
          first_at = CASE WHEN excluded.first_at < digest_windows.first_at THEN excluded.first_at ELSE digest_windows.first_at END, \
          last_at = CASE WHEN excluded.last_at > digest_windows.last_at THEN excluded.last_at ELSE digest_windows.last_at END \
        RETURNING id, count, closes_at";
    pub const DIGEST_ITEM: &str = "INSERT INTO digest_items (window_id, n, payload) VALUES ($1, $2, $3)";
    /// Claims (`$1` user, `$2` key) before the entry is added; the real values
    /// follow in [`DIGEST_KEY_SET`]. On PostgreSQL a concurrent claim of the
    /// same key waits here for this transaction, then does nothing.
    pub const DIGEST_KEY_CLAIM: &str = "INSERT INTO digest_entry_keys \
        (user_id, idempotency_key, window_id, count, closes_at) VALUES ($1, $2, '', 0, 0) \
        ON CONFLICT (user_id, idempotency_key) DO NOTHING";
    pub const DIGEST_KEY_SET: &str = "UPDATE digest_entry_keys SET window_id = $3, count = $4, closes_at = $5 \
        WHERE user_id = $1 AND idempotency_key = $2";
    pub const DIGEST_KEY: &str =
        "SELECT window_id, count, closes_at FROM digest_entry_keys WHERE user_id = $1 AND idempotency_key = $2";
    pub const DIGEST_ERASE_KEYS: &str = "DELETE FROM digest_entry_keys WHERE user_id = $1";
    /// `$1` before, `$2` chunk; in `closes_at` order so that the index is
    /// used with or without statistics (as retention's `PURGE_CHUNK_SQL`).
    pub const DIGEST_PURGE_KEYS: &str = "DELETE FROM digest_entry_keys WHERE (user_id, idempotency_key) IN \
        (SELECT user_id, idempotency_key FROM digest_entry_keys WHERE closes_at < $1 ORDER BY closes_at LIMIT $2)";

    /// `$1` owner, `$2` lease until, `$3` now, `$4` limit; then the lock clause.
    pub fn digest_claim(lock: &str) -> String {
        format!(
            "UPDATE digest_windows SET sealed = 1, owner = $1, lease_until = $2 \
             WHERE id IN (SELECT id FROM digest_windows \
                          WHERE closes_at <= $3 AND (owner IS NULL OR lease_until <= $3) \
                          ORDER BY closes_at LIMIT $4 {lock}) \
             RETURNING id, user_id, digest_key, topic, first_at, last_at, count, closes_at"
        )
    }
    pub const DIGEST_ITEMS: &str = "SELECT payload FROM digest_items WHERE window_id = $1 ORDER BY n";
    pub const DIGEST_DELETE_ITEMS: &str = "DELETE FROM digest_items WHERE window_id = $1";
    pub const DIGEST_DELETE: &str = "DELETE FROM digest_windows WHERE id = $1";
    pub const DIGEST_ERASE_ITEMS: &str =
        "DELETE FROM digest_items WHERE window_id IN (SELECT id FROM digest_windows WHERE user_id = $1)";
    pub const DIGEST_ERASE: &str = "DELETE FROM digest_windows WHERE user_id = $1";
    /// When a closer next has something to do: a free window's close, or a
    /// held window's lease running out (its holder may have died).
    pub const DIGEST_NEXT: &str = "SELECT MIN(CASE WHEN owner IS NULL OR lease_until < closes_at \
        THEN closes_at ELSE lease_until END) FROM digest_windows";

    pub const SKIP_LOCKED: &str = "FOR UPDATE SKIP LOCKED";
}

/// A `jobs` row as both stores return it.
#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: String,
    kind: String,
    payload: String,
    state: String,
    attempts: i64,
    done: i64,
    total: i64,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Job, StoreError> {
        let state = JobState::parse(&row.state)
            .ok_or_else(|| StoreError::Internal(format!("job {} has an unknown state `{}`", row.id, row.state)))?;
        Ok(Job {
            id: row.id,
            kind: row.kind,
            payload: row.payload,
            state,
            attempts: row.attempts.max(0) as u32,
            done: row.done,
            total: row.total,
            error: row.error,
            created_at_ms: row.created_at,
            updated_at_ms: row.updated_at,
        })
    }
}

/// A claimed `digest_windows` row, before its items are read.
#[derive(sqlx::FromRow)]
pub(crate) struct WindowRow {
    id: String,
    user_id: String,
    digest_key: String,
    topic: String,
    first_at: i64,
    last_at: i64,
    count: i64,
    closes_at: i64,
}

impl WindowRow {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The window with its items, which must be valid JSON (they were when added).
    pub(crate) fn with_items(self, items: Vec<String>) -> Result<DigestWindow, StoreError> {
        let items = items
            .into_iter()
            .map(|text| {
                RawValue::from_string(text)
                    .map(Arc::from)
                    .map_err(|e| StoreError::Internal(format!("digest {} holds bad JSON: {e}", self.id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DigestWindow {
            id: self.id,
            user_id: self.user_id.into(),
            key: self.digest_key,
            topic: self.topic.into(),
            first_at_ms: self.first_at,
            last_at_ms: self.last_at,
            count: self.count,
            items,
            closes_at_ms: self.closes_at,
        })
    }
}

/// How the outcome is written: (state, due at, error).
pub(crate) fn outcome_columns(outcome: &JobOutcome, now_ms: i64) -> (JobState, i64, Option<&str>) {
    match outcome {
        JobOutcome::Done => (JobState::Done, now_ms, None),
        JobOutcome::Retry { at_ms, error } => (JobState::Queued, *at_ms, Some(error.as_str())),
        JobOutcome::Failed { error } => (JobState::Failed, now_ms, Some(error.as_str())),
    }
}

/// Entries in a stable lock order (user, key), with their place in the input,
/// so concurrent batches never wait on each other in a cycle.
pub(crate) fn lock_order(entries: &[DigestEntry]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| (&entries[a].user_id, &entries[a].key).cmp(&(&entries[b].user_id, &entries[b].key)));
    order
}

/// The [`JobStore`] implementation both stores share: the same statements
/// ([`sql`]) through each store's `pool`. `$begin` opens a transaction that
/// holds the write lock from its start where the database needs that said
/// (SQLite: `BEGIN IMMEDIATE`); `$lock` ends the claims' inner selects
/// (PostgreSQL: [`sql::SKIP_LOCKED`], so concurrent claimers pass over each
/// other's rows instead of waiting; SQLite: nothing, a claim is one statement
/// under its single writer lock).
/// Every write goes through the store's `for_writing` (a pool connection,
/// and on SQLite a turn at the write lock beside its writer thread), held
/// for that statement or transaction only.
macro_rules! impl_job_store {
    ($store:ty, begin: $begin:expr, lock: $lock:expr) => {
        const _: () = {
            use std::time::Duration;

            use async_trait::async_trait;
            use sqlx::Connection;

            use $crate::store::jobs::{
                lock_order, outcome_columns, sql, DigestAdded, DigestEntry, DigestWindow, Job, JobOutcome, JobRow,
                JobStore, NewJob, WindowRow, DIGEST_ITEMS,
            };
            use $crate::store::{now_ms, StoreError, DELETE_CHUNK};

            #[async_trait]
            impl JobStore for $store {
                async fn enqueue(&self, job: NewJob) -> Result<(String, bool), StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let inserted = sqlx::query(sql::ENQUEUE)
                        .bind(&job.id)
                        .bind(&job.kind)
                        .bind(&job.payload)
                        .bind(job.total)
                        .bind(now_ms())
                        .bind(&job.idempotency_key)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    if inserted.rows_affected() == 1 {
                        return Ok((job.id, true));
                    }
                    let requeued: Vec<String> = sqlx::query_scalar(sql::REQUEUE_FAILED)
                        .bind(&job.idempotency_key)
                        .bind(now_ms())
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    if let Some(id) = requeued.into_iter().next() {
                        return Ok((id, true));
                    }
                    let id: String = sqlx::query_scalar(sql::JOB_BY_KEY)
                        .bind(&job.idempotency_key)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    Ok((id, false))
                }

                async fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Job>, StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let now = now_ms();
                    // `fetch_all`, not `fetch_optional`: see `sql::claim`.
                    let rows: Vec<JobRow> = sqlx::query_as(&sql::claim($lock))
                        .bind(owner)
                        .bind(now + lease.as_millis() as i64)
                        .bind(now)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    rows.into_iter().next().map(Job::try_from).transpose()
                }

                async fn progress(
                    &self,
                    id: &str,
                    owner: &str,
                    done: i64,
                    lease: Duration,
                ) -> Result<bool, StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let now = now_ms();
                    let updated = sqlx::query(sql::PROGRESS)
                        .bind(done)
                        .bind(now + lease.as_millis() as i64)
                        .bind(now)
                        .bind(id)
                        .bind(owner)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    Ok(updated.rows_affected() == 1)
                }

                async fn finish(&self, id: &str, owner: &str, outcome: JobOutcome) -> Result<(), StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let now = now_ms();
                    let (state, due_at, error) = outcome_columns(&outcome, now);
                    sqlx::query(sql::FINISH)
                        .bind(state.as_str())
                        .bind(due_at)
                        .bind(error)
                        .bind(now)
                        .bind(id)
                        .bind(owner)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    Ok(())
                }

                async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
                    let row: Option<JobRow> = sqlx::query_as(&sql::job())
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    row.map(Job::try_from).transpose()
                }

                async fn digest_add(&self, entries: Vec<DigestEntry>) -> Result<Vec<DigestAdded>, StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let mut tx = conn.begin_with($begin).await.map_err(|e| self.db_error(e))?;
                    let mut added = vec![None; entries.len()];
                    for i in lock_order(&entries) {
                        let entry = &entries[i];
                        if let Some(key) = &entry.idempotency_key {
                            let claimed = sqlx::query(sql::DIGEST_KEY_CLAIM)
                                .bind(&*entry.user_id)
                                .bind(&**key)
                                .execute(&mut *tx)
                                .await
                                .map_err(|e| self.db_error(e))?;
                            if claimed.rows_affected() == 0 {
                                let (window_id, count, closes_at_ms): (String, i64, i64) =
                                    sqlx::query_as(sql::DIGEST_KEY)
                                        .bind(&*entry.user_id)
                                        .bind(&**key)
                                        .fetch_one(&mut *tx)
                                        .await
                                        .map_err(|e| self.db_error(e))?;
                                added[i] = Some(DigestAdded { window_id, count, closes_at_ms, repeated: true });
                                continue;
                            }
                        }
                        sqlx::query(sql::DIGEST_SEAL_EXPIRED)
                            .bind(&*entry.user_id)
                            .bind(&*entry.key)
                            .bind(entry.at_ms)
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| self.db_error(e))?;
                        let (window_id, count, closes_at_ms): (String, i64, i64) = sqlx::query_as(sql::DIGEST_UPSERT)
                            .bind(uuid::Uuid::now_v7().to_string())
                            .bind(&*entry.user_id)
                            .bind(&*entry.key)
                            .bind(&*entry.topic)
                            .bind(entry.at_ms)
                            .bind(entry.at_ms + entry.window_ms)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(|e| self.db_error(e))?;
                        if count <= DIGEST_ITEMS {
                            sqlx::query(sql::DIGEST_ITEM)
                                .bind(&window_id)
                                .bind(count)
                                .bind(entry.payload.get())
                                .execute(&mut *tx)
                                .await
                                .map_err(|e| self.db_error(e))?;
                        }
                        if let Some(key) = &entry.idempotency_key {
                            sqlx::query(sql::DIGEST_KEY_SET)
                                .bind(&*entry.user_id)
                                .bind(&**key)
                                .bind(&window_id)
                                .bind(count)
                                .bind(closes_at_ms)
                                .execute(&mut *tx)
                                .await
                                .map_err(|e| self.db_error(e))?;
                        }
                        added[i] = Some(DigestAdded { window_id, count, closes_at_ms, repeated: false });
                    }
                    tx.commit().await.map_err(|e| self.db_error(e))?;
                    Ok(added.into_iter().flatten().collect())
                }

                async fn digest_claim_due(
                    &self,
                    owner: &str,
                    now_ms: i64,
                    lease: Duration,
                    limit: u32,
                ) -> Result<Vec<DigestWindow>, StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let rows: Vec<WindowRow> = sqlx::query_as(&sql::digest_claim($lock))
                        .bind(owner)
                        .bind(now_ms + lease.as_millis() as i64)
                        .bind(now_ms)
                        .bind(i64::from(limit))
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    let mut windows = Vec::with_capacity(rows.len());
                    for row in rows {
                        let items: Vec<String> = sqlx::query_scalar(sql::DIGEST_ITEMS)
                            .bind(row.id())
                            .fetch_all(&mut *conn)
                            .await
                            .map_err(|e| self.db_error(e))?;
                        windows.push(row.with_items(items)?);
                    }
                    Ok(windows)
                }

                async fn digest_delete(&self, id: &str) -> Result<(), StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let mut tx = conn.begin_with($begin).await.map_err(|e| self.db_error(e))?;
                    sqlx::query(sql::DIGEST_DELETE_ITEMS)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    sqlx::query(sql::DIGEST_DELETE).bind(id).execute(&mut *tx).await.map_err(|e| self.db_error(e))?;
                    tx.commit().await.map_err(|e| self.db_error(e))?;
                    Ok(())
                }

                async fn digest_next_close(&self) -> Result<Option<i64>, StoreError> {
                    Ok(sqlx::query_scalar(sql::DIGEST_NEXT)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| self.db_error(e))?)
                }

                async fn digest_erase(&self, user: &str) -> Result<u64, StoreError> {
                    let (mut conn, _turn) = self.for_writing().await?;
                    let mut tx = conn.begin_with($begin).await.map_err(|e| self.db_error(e))?;
                    sqlx::query(sql::DIGEST_ERASE_ITEMS)
                        .bind(user)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    let windows = sqlx::query(sql::DIGEST_ERASE)
                        .bind(user)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    sqlx::query(sql::DIGEST_ERASE_KEYS)
                        .bind(user)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    tx.commit().await.map_err(|e| self.db_error(e))?;
                    Ok(windows.rows_affected())
                }

                async fn digest_purge_keys(&self, before_ms: i64) -> Result<u64, StoreError> {
                    let mut purged = 0;
                    loop {
                        let (mut conn, _turn) = self.for_writing().await?;
                        let deleted = sqlx::query(sql::DIGEST_PURGE_KEYS)
                            .bind(before_ms)
                            .bind(DELETE_CHUNK)
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| self.db_error(e))?
                            .rows_affected();
                        purged += deleted;
                        if deleted < DELETE_CHUNK as u64 {
                            return Ok(purged);
                        }
                    }
                }
            }
        };
    };
}
pub(crate) use impl_job_store;
