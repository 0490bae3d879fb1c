//! The store: where every notification is committed before it is
//! acknowledged, and where sessions catch up from.
//!
//! [`Store`] is the interface; [`sqlite`] is the embedded default. Whatever
//! implements it must keep the guarantees written on each method — the
//! delivery guarantees of spec §5 rest on them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{ReadMark, Seq};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde_json::value::RawValue;

pub mod epochs;
pub mod jobs;
mod plan;
pub mod postgres;
pub mod sqlite;

pub use epochs::EpochStore;
pub use jobs::JobStore;

/// Rows deleted per statement by retention and erasure, so neither holds
/// long locks.
pub(crate) const DELETE_CHUNK: i64 = 1000;

/// Retention: a chunk of notifications created before `$1` (`$2` rows),
/// oldest first. The order is what makes PostgreSQL read them through
/// `notifications_created_at` also while it has no statistics for the table
/// (new, or filled faster than autovacuum analyzes it): without it the
/// planner took a third of the rows to be old and read the whole table on
/// every pass, even one with nothing to delete.
const PURGE_CHUNK_SQL: &str = "DELETE FROM notifications WHERE (user_id, seq) IN \
     (SELECT user_id, seq FROM notifications WHERE created_at < $1 ORDER BY created_at LIMIT $2)";

/// How many stored notifications lie beyond their user's counter (or have
/// no counter): 0 in a sound store, whatever retention or erasure did.
const BEYOND_COUNTER_SQL: &str = "SELECT COUNT(*) FROM notifications n LEFT JOIN users u ON u.user_id = n.user_id \
     WHERE u.last_seq IS NULL OR n.seq > u.last_seq";

/// The revocations changed at or after `$1` (unix ms).
const REVOCATIONS_SQL: &str = "SELECT user_id, issued_before, expires_at FROM revocations WHERE updated_ms >= $1";

/// The single tokens revoked at or after `$1` (unix ms).
const TOKEN_REVOCATIONS_SQL: &str = "SELECT user_id, jti, expires_at FROM token_revocations WHERE updated_ms >= $1";

/// Deletes the revocations whose `expires_at` (unix seconds) is before `$1`.
const PURGE_REVOCATIONS_SQL: &str = "DELETE FROM revocations WHERE expires_at < $1";

/// Deletes the single tokens' revocations whose `expires_at` is before `$1`.
const PURGE_TOKEN_REVOCATIONS_SQL: &str = "DELETE FROM token_revocations WHERE expires_at < $1";

/// A single token's revocation, merged with the one stored: the later
/// `expires_at` (NULL, never, is the latest). `$1` user, `$2` jti, `$3` expires_at, `$4` updated_ms.
const REVOKE_TOKEN_SQL: &str = "INSERT INTO token_revocations (user_id, jti, expires_at, updated_ms) \
     VALUES ($1, $2, $3, $4) \
     ON CONFLICT (user_id, jti) DO UPDATE SET \
     expires_at = CASE WHEN excluded.expires_at IS NULL OR token_revocations.expires_at IS NULL THEN NULL \
                       WHEN excluded.expires_at > token_revocations.expires_at THEN excluded.expires_at \
                       ELSE token_revocations.expires_at END, \
     updated_ms = excluded.updated_ms \
     RETURNING user_id, jti, expires_at";

/// A revocation row's answer: merged with the one stored, the later
/// `issued_before` and the later `expires_at` (NULL, never, is the latest).
/// `$1` user, `$2` issued_before, `$3` expires_at, `$4` updated_ms.
const REVOKE_SQL: &str = "INSERT INTO revocations (user_id, issued_before, expires_at, updated_ms) \
     VALUES ($1, $2, $3, $4) \
     ON CONFLICT (user_id) DO UPDATE SET \
     issued_before = CASE WHEN excluded.issued_before > revocations.issued_before \
                          THEN excluded.issued_before ELSE revocations.issued_before END, \
     expires_at = CASE WHEN excluded.expires_at IS NULL OR revocations.expires_at IS NULL THEN NULL \
                       WHEN excluded.expires_at > revocations.expires_at THEN excluded.expires_at \
                       ELSE revocations.expires_at END, \
     updated_ms = excluded.updated_ms \
     RETURNING user_id, issued_before, expires_at";

/// Erasure: user `$1`'s oldest `$3` notifications with `seq <= $2`.
const ERASE_CHUNK_SQL: &str = "DELETE FROM notifications WHERE user_id = $1 AND seq IN \
     (SELECT seq FROM notifications WHERE user_id = $1 AND seq <= $2 ORDER BY seq LIMIT $3)";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the work; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or corrupt data.
    #[error("store error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // `Tls`: a server that declines the TLS its `sslmode` requires
            // (failed handshakes come as `Io`). After start, that is a server
            // restarted or replaced, as transient as a refused connection.
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if postgres::is_unavailable(db.as_ref()) => {
                StoreError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(ref db) if sqlite::is_unavailable_error(db.as_ref()) => {
                StoreError::Unavailable(e.to_string())
            }
            other => StoreError::Internal(other.to_string()),
        }
    }
}

/// What the group-commit writers measure of each group, for the node's
/// metrics: how many notifications share a commit (and its WAL flush) and
/// how long the commit itself took, apart from the queue before it, which
/// `herald_publish_commit_seconds` includes. Cheap handles: clones share the
/// counts. The default is not registered anywhere (tests, tools).
#[derive(Debug, Clone)]
pub struct GroupCommits {
    /// Notifications per committed group; its count is the groups committed.
    pub size: Histogram,
    /// A committed group's transaction, from its `BEGIN` (SQLite: taking
    /// the write lock) or taking a connection (PostgreSQL) to its commit
    /// answering, retries included.
    pub seconds: Histogram,
    /// Groups that failed: each refused every publish in it.
    pub failed: Counter,
}

impl Default for GroupCommits {
    fn default() -> Self {
        GroupCommits {
            // 1 … 8,192: past a group's cap, as one large batch commits whole.
            size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            seconds: Histogram::new(exponential_buckets(0.000_125, 2.0, 16)),
            failed: Counter::default(),
        }
    }
}

/// A writer's record of its group commits: the metrics above for every
/// group, and a log of the ones that fail. An outage (the database down,
/// its disk full) fails every group until it is mended: the log says when
/// it starts, each other error it brings once, and when it ends — not once
/// per group. An unavailable store is a `warn`, anything else an `error`, as
/// at the HTTP edge.
pub(crate) struct CommitLog {
    metrics: GroupCommits,
    in_a_row: u64,
    /// The errors of this run logged so far (at most [`Self::KINDS`]).
    logged: Vec<StoreError>,
}

impl CommitLog {
    /// Distinct errors logged per run; more are logged at `debug`.
    const KINDS: usize = 16;

    pub(crate) fn new(metrics: GroupCommits) -> CommitLog {
        CommitLog { metrics, in_a_row: 0, logged: Vec::new() }
    }

    /// A group of `notifications` failed with `err`; its publishes are refused.
    pub(crate) fn failed(&mut self, err: &StoreError, notifications: usize) {
        self.metrics.failed.inc();
        self.in_a_row += 1;
        if self.logged.contains(err) || self.logged.len() >= Self::KINDS {
            tracing::debug!(error = %err, notifications, in_a_row = self.in_a_row, "group commit failed");
            return;
        }
        const FAILED: &str =
            "group commit failed; its publishes are refused (this error again is logged at debug until a commit succeeds)";
        match err {
            StoreError::Unavailable(_) => tracing::warn!(error = %err, notifications, "{FAILED}"),
            StoreError::Internal(_) => tracing::error!(error = %err, notifications, "{FAILED}"),
        }
        self.logged.push(err.clone());
    }

    /// A group of `notifications` committed; its transaction took `took`.
    pub(crate) fn committed(&mut self, notifications: usize, took: Duration) {
        self.metrics.size.observe(notifications as f64);
        self.metrics.seconds.observe(took.as_secs_f64());
        if self.in_a_row > 0 {
            tracing::info!(failed_in_a_row = self.in_a_row, "group commits succeed again");
            self.in_a_row = 0;
            self.logged.clear();
        }
    }
}

/// One notification to store for one user.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub user_id: Arc<str>,
    /// Chosen by the caller (UUIDv7), so a retry after a lost answer is recognisable.
    pub id: String,
    pub topic: Arc<str>,
    /// Raw JSON text.
    pub payload: Arc<RawValue>,
    pub created_at_ms: i64,
    pub idempotency_key: Option<Arc<str>>,
}

/// A committed notification.
#[derive(Debug, Clone)]
pub struct StoredNotification {
    pub user_id: Arc<str>,
    pub seq: Seq,
    pub id: String,
    pub topic: Arc<str>,
    pub payload: Arc<RawValue>,
    pub created_at_ms: i64,
    pub read: bool,
}

/// The topic of the last row a store decoded: consecutive rows usually
/// share one, and then share its text rather than each copying it (both
/// stores' row decoders).
#[derive(Default)]
pub(crate) struct SharedTopic(Option<Arc<str>>);

impl SharedTopic {
    pub fn of(&mut self, topic: &str) -> Arc<str> {
        match &self.0 {
            Some(same) if **same == *topic => same.clone(),
            _ => self.0.insert(topic.into()).clone(),
        }
    }
}

impl StoredNotification {
    /// The `notification` frame, encoded once.
    pub fn frame(&self) -> String {
        herald_protocol::encode_notification(
            self.seq,
            &self.id,
            &self.topic,
            &self.payload,
            Rfc3339Ms::of(self.created_at_ms).as_str(),
            self.read,
        )
    }

    /// As the inbox API shows it: the payload byte-exact, as in frames.
    pub fn to_api(&self) -> herald_protocol::Notification<Box<RawValue>> {
        herald_protocol::Notification {
            seq: self.seq,
            id: self.id.clone(),
            topic: self.topic.to_string(),
            payload: (*self.payload).to_owned(),
            created_at: rfc3339_ms(self.created_at_ms),
            read: self.read,
        }
    }
}

/// The outcome of appending one notification.
#[derive(Debug, Clone)]
pub struct Appended {
    pub notification: StoredNotification,
    /// `false` when the idempotency key matched an earlier notification:
    /// `notification` is that earlier one and nothing was stored.
    pub created: bool,
}

/// A user's position in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The newest committed seq (0 when the user has none).
    pub last_seq: Seq,
    /// The oldest retained seq; `last_seq + 1` when nothing is retained.
    /// From [`Store::resume`] with `since`: the oldest retained seq after
    /// `since` (see [`Head::resumed`]).
    pub oldest_seq: Seq,
}

impl Head {
    /// The head of a user whose newest committed seq is `last_seq` and whose
    /// oldest retained one is `oldest` (`None`: nothing retained).
    pub fn new(last_seq: Seq, oldest: Option<Seq>) -> Head {
        Head { last_seq, oldest_seq: oldest.unwrap_or(last_seq + 1) }
    }

    /// The head [`Store::resume`] answers a session that says `since`, from
    /// the user's `last_seq` and the first seq after `since` still stored
    /// (the first of a page of at least one; `None` when it came back empty).
    ///
    /// Its `oldest_seq` is that first seq, not the user's oldest: it is what
    /// the welcome's `oldest_seq` means (seqs `since + 1 ..` it are gone,
    /// spec §2), and it gives the same [`Head::resume_after`]. A store then
    /// need not look up the oldest seq, an index descent and a row read per
    /// reconnect (docs/BENCHMARKS.md, "The PostgreSQL replay, leaner").
    pub fn resumed(last_seq: Seq, first_after_since: Option<Seq>) -> Head {
        Head::new(last_seq, first_after_since)
    }

    /// The last seq a session that says `since` has already seen: `since`
    /// itself, but never before the oldest retained seq (older ones are
    /// gone; the welcome says `truncated`) and never beyond `last_seq` (a seq
    /// no commit has handed out cannot be real). `last_seq` without `since`.
    pub fn resume_after(&self, since: Option<Seq>) -> Seq {
        match since {
            Some(since) => since.max(self.oldest_seq - 1).min(self.last_seq),
            None => self.last_seq,
        }
    }
}

/// Filters of the inbox listing (newest first).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub before_seq: Option<Seq>,
    pub after_seq: Option<Seq>,
    pub limit: u32,
    pub unread_only: bool,
    /// Only this topic's notifications.
    pub topic: Option<String>,
}

/// A user's token revocation: tokens issued before `issued_before` (unix
/// seconds) are refused; after `expires_at` (`None`: never) every token it
/// covers has expired, and it may be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Revocation {
    pub user_id: String,
    pub issued_before: i64,
    pub expires_at: Option<i64>,
}

/// One token of a user revoked alone: the token whose `jti` this is is
/// refused; after `expires_at` (`None`: never) it has expired, and the
/// revocation may be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRevocation {
    pub user_id: String,
    pub jti: String,
    pub expires_at: Option<i64>,
}

/// What [`Store::revocations`] read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Revocations {
    pub changed: Vec<Revocation>,
    /// Single tokens' revocations, read the same way.
    pub tokens: Vec<TokenRevocation>,
    /// The store's clock (unix ms) before the read: the next read asks from
    /// a little before it, for writes that committed late.
    pub as_of_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unread {
    pub total: i64,
    pub by_topic: Vec<(String, i64)>,
}

/// Durable storage of notifications and read state (and, through
/// [`JobStore`], of jobs and digest windows).
#[async_trait]
pub trait Store: JobStore + EpochStore + Send + Sync + 'static {
    /// Stores each notification and assigns it the user's next `seq` **in the
    /// same transaction as the insert**, so each user's seqs are 1, 2, 3, …
    /// without gaps, in commit order. Durable when it returns `Ok`.
    /// An entry whose (user, idempotency key) is already stored stores
    /// nothing and returns the earlier notification with `created = false`.
    /// The answer is in the order of `batch`.
    async fn append(&self, batch: Vec<NewNotification>) -> Result<Vec<Appended>, StoreError>;

    /// The user's newest and oldest retained seq.
    async fn head(&self, user: &str) -> Result<Head, StoreError>;

    /// What a session starts with: the user's head and, when it says
    /// `since`, the first `limit` notifications after
    /// [`Head::resume_after`] — what [`Store::head`] then [`Store::after`]
    /// answer. A store may answer both in one request (the SQLite readers
    /// and PostgreSQL's batches do), and then, with `since`, answers the
    /// head of [`Head::resumed`]: the page's first seq stands for the oldest.
    async fn resume(
        &self,
        user: &str,
        since: Option<Seq>,
        limit: u32,
    ) -> Result<(Head, Vec<StoredNotification>), StoreError> {
        let head = self.head(user).await?;
        let page = match since {
            Some(_) => self.after(user, head.resume_after(since), None, limit).await?,
            None => Vec::new(),
        };
        Ok((head, page))
    }

    /// The newest committed seq of each user (0 for a user with none), in
    /// the order of `users` — one query for many users, for the periodic
    /// check that repairs what the broker lost.
    async fn last_seqs(&self, users: &[Arc<str>]) -> Result<Vec<Seq>, StoreError>;

    /// The user's notifications with `after < seq <= up_to` (no upper bound
    /// when `None`), in increasing seq, at most `limit`. Every seq up to the
    /// newest committed one is there unless retention purged it.
    async fn after(
        &self,
        user: &str,
        after: Seq,
        up_to: Option<Seq>,
        limit: u32,
    ) -> Result<Vec<StoredNotification>, StoreError>;

    /// The inbox listing: newest first.
    async fn list(&self, user: &str, query: &ListQuery) -> Result<Vec<StoredNotification>, StoreError>;

    /// Marks notifications read; returns the seqs that changed from unread
    /// to read, ascending.
    async fn mark_read(&self, user: &str, mark: &ReadMark) -> Result<Vec<Seq>, StoreError>;

    /// Unread counts, from what the store keeps as notifications are stored,
    /// marked and deleted (SQLite: a counter per user and topic; PostgreSQL:
    /// a partial index of the unread ones); never a count over the user's
    /// history. Topics with none unread are left out.
    async fn unread(&self, user: &str) -> Result<Unread, StoreError>;

    /// Deletes notifications created before `before_ms`. Seqs are never
    /// reused: a user's counter survives the purge of all their notifications.
    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// Deletes the user's notifications with `seq <= up_to`, with their read
    /// state and idempotency keys; returns how many. Oldest first, a chunk
    /// per statement, so what is left is always a contiguous tail (a replay
    /// running meanwhile never meets a hole). As with [`purge`](Self::purge)
    /// the counter stays: seqs are never reused, and a session resuming
    /// below what is left is told `truncated`.
    async fn erase(&self, user: &str, up_to: Seq) -> Result<u64, StoreError>;

    /// Stores `revocation`, merged with the user's earlier one (the later
    /// `issued_before`, the later `expires_at`: a revocation never moves
    /// back); returns the one in force afterwards.
    async fn revoke(&self, revocation: &Revocation) -> Result<Revocation, StoreError>;

    /// Stores a single token's revocation, merged with an earlier one of the
    /// same token (the later `expires_at`); returns the one in force.
    async fn revoke_token(&self, revocation: &TokenRevocation) -> Result<TokenRevocation, StoreError>;

    /// Deletes the revocations that expired before `now_secs`, single
    /// tokens' too; how many.
    async fn purge_revocations(&self, now_secs: i64) -> Result<u64, StoreError>;

    /// The revocations changed at or after `since_ms` on the store's clock
    /// (every one with `None`), single tokens' too, and that clock's time
    /// before they were read.
    async fn revocations(&self, since_ms: Option<i64>) -> Result<Revocations, StoreError>;

    /// Answers when the database does.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Finishes queued writes and closes connections.
    async fn close(&self);

    /// Connections in the pool: `(busy, idle)`.
    fn pool_usage(&self) -> (u32, u32);
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `2026-11-22T10:00:00.123Z`: UTC, to the millisecond. Written by hand
/// (every replayed notification formats one; `time`'s formatter took 44%
/// of encoding a frame). Outside the years 0000–9999 it gives the epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    Rfc3339Ms::of(ms).as_str().to_owned()
}

/// [`rfc3339_ms`] on the stack, for the frame encoder (no allocation).
pub struct Rfc3339Ms([u8; 24]);

impl Rfc3339Ms {
    pub fn of(ms: i64) -> Rfc3339Ms {
        /// 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
        const RANGE: std::ops::RangeInclusive<i64> = -62_167_219_200_000..=253_402_300_799_999;
        let ms = if RANGE.contains(&ms) { ms } else { 0 };
        const DAY_MS: i64 = 86_400_000;
        let (year, month, day) = civil_from_days(ms.div_euclid(DAY_MS));
        let in_day = ms.rem_euclid(DAY_MS);
        let mut out = [0u8; 24];
        let mut put = |at: usize, value: i64, width: usize| {
            let mut v = value;
            for i in (0..width).rev() {
                out[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, year, 4);
        put(5, month, 2);
        put(8, day, 2);
        put(11, in_day / 3_600_000, 2);
        put(14, in_day / 60_000 % 60, 2);
        put(17, in_day / 1000 % 60, 2);
        put(20, in_day % 1000, 3);
        for (at, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')] {
            out[at] = c;
        }
        Rfc3339Ms(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII digits and separators")
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Connection settings shared by every store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Connections in the pool (PostgreSQL: writers and readers together;
    /// SQLite: readers, beside its one writer).
    pub pool_size: u32,
    /// SQLite: the page cache of its writer's connection, in MiB. A group
    /// commit of random users writes a leaf per notification; pages the
    /// cache does not hold are read back from the file first.
    pub sqlite_cache_mib: u32,
    /// Longest a statement may run before the database cancels it.
    pub statement_timeout: Duration,
    /// Longest a request waits for a connection (or to connect).
    pub connect_timeout: Duration,
    /// Where the group-commit writers record each group.
    pub group_commits: GroupCommits,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            pool_size: 8,
            sqlite_cache_mib: 64,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            group_commits: GroupCommits::default(),
        }
    }
}

/// The migrations to run at start. Migrations a newer build applied, which
/// this build does not know, are allowed: each migration only adds to the
/// schema (docs/operations.md, "Upgrading"), so during a rolling upgrade a
/// node of the older build still starts, or restarts, on the newer schema.
fn migrator(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// `postgres://…` / `postgresql://…` select PostgreSQL; anything else is SQLite.
pub fn is_postgres(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

/// Opens the store named by `database_url` and runs its migrations.
pub async fn open(database_url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    if is_postgres(database_url) {
        postgres::open(database_url, options).await
    } else {
        Ok(Arc::new(sqlite::SqliteStore::open(database_url, options).await?))
    }
}

/// `herald backup`: a consistent copy of the SQLite store named by
/// `database_url` in the new file `to`, safe while a node runs. PostgreSQL
/// has its own tools for that (`pg_dump`, `pg_basebackup`).
pub async fn backup(database_url: &str, to: &std::path::Path) -> Result<sqlite::Backup, StoreError> {
    if is_postgres(database_url) {
        return Err(StoreError::Internal(
            "herald backup copies the SQLite store; back PostgreSQL up with its own tools (pg_dump, pg_basebackup)"
                .into(),
        ));
    }
    sqlite::backup(database_url, to).await
}

/// `herald restore`: puts the SQLite backup `from` in place of the store
/// named by `database_url` (its node stopped), migrates it and marks it
/// restored; the new epoch and what was done. PostgreSQL: `pg_restore`,
/// then [`mark_restored`].
pub async fn restore(database_url: &str, from: &std::path::Path) -> Result<(String, sqlite::Restore), StoreError> {
    if is_postgres(database_url) {
        return Err(StoreError::Internal(
            "herald restore puts a SQLite backup in place; restore PostgreSQL with its own tools, then run \
             herald mark-restored"
                .into(),
        ));
    }
    let restored = sqlite::restore(database_url, from).await?;
    match mark_restored(database_url).await {
        Ok(epoch) => Ok((epoch, restored)),
        Err(e) => Err(StoreError::Internal(format!(
            "the backup is in place, but the store could not be marked restored ({e}): run herald mark-restored \
             before starting the node"
        ))),
    }
}

/// `herald mark-restored`: records that the store named by `database_url`
/// was just restored from a backup ([`EpochStore::mark_restored`]); the new epoch.
pub async fn mark_restored(database_url: &str) -> Result<String, StoreError> {
    let options = StoreOptions { pool_size: 1, ..StoreOptions::default() };
    let store = open(database_url, &options).await?;
    let marked = store.mark_restored().await;
    store.close().await;
    marked
}

/// `herald check`: the store named by `database_url` is sound — SQLite's
/// `PRAGMA integrity_check` passes (SQLite only), and no notification is
/// beyond its user's counter; `(users, notifications)`. Read-only; safe
/// beside running nodes. Run it after a crash, a restore or a disk scare.
pub async fn check(database_url: &str) -> Result<(i64, i64), StoreError> {
    if is_postgres(database_url) {
        postgres::check(database_url, StoreOptions::default().connect_timeout).await
    } else {
        sqlite::check(database_url).await
    }
}

/// Runs the migrations of the store named by `database_url`, alone.
pub async fn migrate(database_url: &str) -> Result<(), StoreError> {
    let options = StoreOptions { pool_size: 1, ..StoreOptions::default() };
    let store = open(database_url, &options).await?;
    store.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        assert_eq!(super::rfc3339_ms(1_795_860_000_123), "2026-11-28T10:00:00.123Z");
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }

    /// What the `time` crate writes for the same instant.
    fn by_time(ms: i64) -> String {
        use time::macros::format_description;
        let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
        time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap().format(&format).unwrap()
    }

    #[test]
    fn the_hand_written_timestamps_agree_with_the_time_crate() {
        let edges = [
            0,
            -1,
            951_782_400_000,     // 2000-02-29
            951_868_799_999,     // its last millisecond
            4_107_542_400_000,   // 2100-03-01 (2100 is not a leap year)
            1_709_164_800_000,   // 2024-02-29
            -62_167_219_200_000, // 0000-01-01
            253_402_300_799_999, // 9999-12-31T23:59:59.999
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let spread = (0..20_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 316_000_000_000_000) as i64 - 62_167_219_200_000
        });
        for ms in edges.into_iter().chain(spread).filter(|ms| *ms <= 253_402_300_799_999) {
            assert_eq!(super::rfc3339_ms(ms), by_time(ms), "at {ms} ms");
        }
        for outside in [-62_167_219_200_001, 253_402_300_800_000, i64::MIN, i64::MAX] {
            assert_eq!(super::rfc3339_ms(outside), "1970-01-01T00:00:00.000Z");
        }
    }
}
