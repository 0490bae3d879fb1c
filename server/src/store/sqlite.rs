//! The embedded default store: one SQLite file in WAL mode.
//!
//! Appends go through one writer task that owns one connection and commits
//! whatever has queued up in a single `BEGIN IMMEDIATE` transaction (group
//! commit): SQLite has one writer at a time anyway, and one fsync then covers
//! many publishes. Inside it, a few multi-row statements read the counters
//! and the repeated idempotency keys, insert the new notifications and write
//! the counters back; seqs are decided in Rust ([`super::plan`]). `synchronous=FULL`, so a commit survives power loss.
//! Reads use a small pool; WAL lets them run beside the writer.

mod jobs;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{ReadMark, Seq};
use serde_json::value::RawValue;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::plan::{Key, Plan};
use super::{Appended, Head, ListQuery, NewNotification, Store, StoreError, StoredNotification, Unread};

/// `SELECT <the columns from_row reads> FROM notifications <rest>`.
macro_rules! select {
    ($rest:literal) => {
        concat!("SELECT seq, id, topic, payload, created_at, read FROM notifications ", $rest)
    };
}

fn from_row(user: &Arc<str>, row: &SqliteRow) -> Result<StoredNotification, sqlx::Error> {
    let payload: String = row.try_get("payload")?;
    let payload = RawValue::from_string(payload).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(StoredNotification {
        user_id: user.clone(),
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        topic: row.try_get::<String, _>("topic")?.into(),
        payload: Arc::from(payload),
        created_at_ms: row.try_get("created_at")?,
        read: row.try_get::<i64, _>("read")? != 0,
    })
}

/// Most notifications committed in one group transaction.
const MAX_GROUP: usize = 2048;
/// Requests waiting for the writer; a full queue makes publishers wait.
const WRITE_QUEUE: usize = 1024;

type AppendReply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;

enum WriteMsg {
    Append(Vec<NewNotification>, AppendReply),
    Close(oneshot::Sender<()>),
}

pub struct SqliteStore {
    pool: SqlitePool,
    writer: mpsc::Sender<WriteMsg>,
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database, then starts the
    /// writer. Several processes opening one new file at once can see
    /// `SQLITE_BUSY` before any busy handler applies (the switch to WAL, a
    /// migration recorded twice), so opening is retried for a few seconds.
    pub async fn open(url: &str, pool_size: u32) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("bad database url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .log_statements(tracing::log::LevelFilter::Trace);
        let mut attempt = 0;
        let (pool, conn) = loop {
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
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_loop(conn, rx));
        Ok(SqliteStore { pool, writer: tx })
    }
}

async fn open_once(
    options: &SqliteConnectOptions,
    pool_size: u32,
) -> Result<(SqlitePool, SqliteConnection), StoreError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await?;
    if let Err(e) = sqlx::migrate!("../migrations/sqlite").run(&pool).await {
        pool.close().await;
        return Err(StoreError::Internal(format!("migrations failed: {e}")));
    }
    let conn = options.connect().await?;
    Ok((pool, conn))
}

async fn write_loop(mut conn: SqliteConnection, mut rx: mpsc::Receiver<WriteMsg>) {
    let mut closing = None;
    while let Some(first) = rx.recv().await {
        let mut group = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                WriteMsg::Append(batch, reply) => {
                    size += batch.len();
                    group.push((batch, reply));
                }
                WriteMsg::Close(done) => {
                    closing = Some(done);
                    break;
                }
            }
            if size < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        if !group.is_empty() {
            commit_group(&mut conn, group).await;
        }
        if closing.is_some() {
            break;
        }
    }
    let _ = conn.close().await;
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

async fn commit_group(conn: &mut SqliteConnection, group: Vec<(Vec<NewNotification>, AppendReply)>) {
    let (batches, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
    let result = async {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        let last_seqs = counters(conn, &batches).await?;
        let earlier = earlier_keys(conn, &batches).await?;
        let plan = Plan::new(&batches, last_seqs, earlier)?;
        write(conn, &plan).await?;
        sqlx::query("COMMIT").execute(&mut *conn).await?;
        Ok::<_, sqlx::Error>(plan.outcomes)
    }
    .await;
    match result {
        Ok(outcomes) => {
            for (reply, out) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            let err = StoreError::from(e);
            tracing::error!(error = %err, "group commit failed; nothing of it was stored");
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Most rows one multi-row statement carries. Smaller statements take the
/// largest power of two that fits, so a handful of statements are prepared
/// (and cached) in all, whatever the group's size.
const ROWS_PER_STATEMENT: usize = 256;

fn statement_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = ROWS_PER_STATEMENT.min(1 << rest.len().ilog2());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// `row` repeated `n` times, comma-separated: the `VALUES` list of a chunk.
fn repeated(row: &str, n: usize) -> String {
    vec![row; n].join(",")
}

/// The group's users' `last_seq` (0 for a user never seen). The writer holds
/// SQLite's write lock from `BEGIN IMMEDIATE`, so no one else moves them.
async fn counters(
    conn: &mut SqliteConnection,
    batches: &[Vec<NewNotification>],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let mut users: Vec<&str> = batches.iter().flatten().map(|n| &*n.user_id).collect();
    users.sort_unstable();
    users.dedup();
    let mut last_seqs: HashMap<String, i64> = users.iter().map(|u| (u.to_string(), 0)).collect();
    for chunk in statement_chunks(&users) {
        let sql = format!("SELECT user_id, last_seq FROM users WHERE user_id IN ({})", repeated("?", chunk.len()));
        let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
        for user in chunk {
            query = query.bind(*user);
        }
        for (user, last) in query.fetch_all(&mut *conn).await? {
            last_seqs.insert(user, last);
        }
    }
    Ok(last_seqs)
}

/// The stored notifications whose (user, idempotency key) the group repeats.
async fn earlier_keys(
    conn: &mut SqliteConnection,
    batches: &[Vec<NewNotification>],
) -> Result<HashMap<Key, StoredNotification>, sqlx::Error> {
    let keyed: Vec<(&str, &str)> =
        batches.iter().flatten().filter_map(|n| n.idempotency_key.as_deref().map(|k| (&*n.user_id, k))).collect();
    let mut earlier = HashMap::new();
    for chunk in statement_chunks(&keyed) {
        let sql = format!(
            "SELECT user_id, idempotency_key, seq, id, topic, payload, created_at, read FROM notifications
             WHERE (user_id, idempotency_key) IN (VALUES {})",
            repeated("(?, ?)", chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for (user, key) in chunk {
            query = query.bind(*user).bind(*key);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let user: Arc<str> = row.try_get::<String, _>("user_id")?.into();
            let key: Arc<str> = row.try_get::<String, _>("idempotency_key")?.into();
            earlier.insert((user.clone(), key), from_row(&user, &row)?);
        }
    }
    Ok(earlier)
}

/// Inserts the new notifications and writes the counters back, many rows a statement.
async fn write(conn: &mut SqliteConnection, plan: &Plan<'_>) -> Result<(), sqlx::Error> {
    let rows = &plan.rows;
    let indexes: Vec<usize> = (0..rows.users.len()).collect();
    for chunk in statement_chunks(&indexes) {
        let sql = format!(
            "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at, idempotency_key) VALUES {}",
            repeated("(?, ?, ?, ?, ?, ?, ?)", chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for &i in chunk {
            query = query
                .bind(rows.users[i])
                .bind(rows.seqs[i])
                .bind(rows.ids[i])
                .bind(rows.topics[i])
                .bind(rows.payloads[i])
                .bind(rows.created[i])
                .bind(rows.keys[i]);
        }
        query.execute(&mut *conn).await?;
    }
    let counters: Vec<(&str, i64)> = plan.counters.iter().map(|(u, s)| (*u, *s)).collect();
    for chunk in statement_chunks(&counters) {
        let sql = format!(
            "INSERT INTO users (user_id, last_seq) VALUES {}
             ON CONFLICT (user_id) DO UPDATE SET last_seq = excluded.last_seq",
            repeated("(?, ?)", chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for (user, last) in chunk {
            query = query.bind(*user).bind(*last);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

fn rows(user: &str, rows: Vec<SqliteRow>) -> Result<Vec<StoredNotification>, StoreError> {
    let user: Arc<str> = user.into();
    Ok(rows.iter().map(|r| from_row(&user, r)).collect::<Result<_, _>>()?)
}

#[async_trait]
impl Store for SqliteStore {
    fn pool_usage(&self) -> (u32, u32) {
        let idle = self.pool.num_idle() as u32;
        (self.pool.size().saturating_sub(idle), idle)
    }

    async fn append(&self, batch: Vec<NewNotification>) -> Result<Vec<Appended>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteMsg::Append(batch, reply))
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the store closed before committing".into()))?
    }

    async fn head(&self, user: &str) -> Result<Head, StoreError> {
        let row = sqlx::query(
            "SELECT u.last_seq AS last_seq,
                    (SELECT MIN(seq) FROM notifications n WHERE n.user_id = u.user_id) AS oldest
             FROM users u WHERE u.user_id = ?",
        )
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Head { last_seq: 0, oldest_seq: 1 },
            Some(row) => {
                let last_seq: i64 = row.try_get("last_seq")?;
                let oldest: Option<i64> = row.try_get("oldest")?;
                Head { last_seq, oldest_seq: oldest.unwrap_or(last_seq + 1) }
            }
        })
    }

    async fn last_seqs(&self, users: &[Arc<str>]) -> Result<Vec<Seq>, StoreError> {
        let list = serde_json::to_string(&users.iter().map(|u| &**u).collect::<Vec<&str>>())
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let found: Vec<(String, i64)> =
            sqlx::query_as("SELECT user_id, last_seq FROM users WHERE user_id IN (SELECT value FROM json_each(?))")
                .bind(list)
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
        let found = sqlx::query(select!("WHERE user_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"))
            .bind(user)
            .bind(after)
            .bind(up_to.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows(user, found)
    }

    async fn list(&self, user: &str, q: &ListQuery) -> Result<Vec<StoredNotification>, StoreError> {
        let found = sqlx::query(select!(
            "WHERE user_id = ? AND seq < ? AND seq > ? AND (read = 0 OR ? = 0) ORDER BY seq DESC LIMIT ?"
        ))
        .bind(user)
        .bind(q.before_seq.unwrap_or(i64::MAX))
        .bind(q.after_seq.unwrap_or(0))
        .bind(q.unread_only)
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await?;
        rows(user, found)
    }

    async fn mark_read(&self, user: &str, mark: &ReadMark) -> Result<u64, StoreError> {
        let done = match mark {
            ReadMark::Seqs { seqs } => {
                let list = serde_json::to_string(seqs).map_err(|e| StoreError::Internal(e.to_string()))?;
                sqlx::query(
                    "UPDATE notifications SET read = 1
                     WHERE user_id = ? AND read = 0 AND seq IN (SELECT value FROM json_each(?))",
                )
                .bind(user)
                .bind(list)
                .execute(&self.pool)
                .await?
            }
            ReadMark::UpTo { up_to_seq } => {
                sqlx::query("UPDATE notifications SET read = 1 WHERE user_id = ? AND read = 0 AND seq <= ?")
                    .bind(user)
                    .bind(up_to_seq)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        let found =
            sqlx::query("SELECT topic, COUNT(*) AS n FROM notifications WHERE user_id = ? AND read = 0 GROUP BY topic")
                .bind(user)
                .fetch_all(&self.pool)
                .await?;
        let mut unread = Unread::default();
        for row in found {
            let n: i64 = row.try_get("n")?;
            unread.total += n;
            unread.by_topic.push((row.try_get("topic")?, n));
        }
        Ok(unread)
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM notifications WHERE rowid IN
                   (SELECT rowid FROM notifications WHERE created_at < ? LIMIT 1000)",
            )
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
            total += done.rows_affected();
            if done.rows_affected() < 1000 {
                return Ok(total);
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.is_closed() {
            return Err(StoreError::Unavailable("the writer has stopped".into()));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.writer.send(WriteMsg::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
        self.pool.close().await;
    }
}
