//! The embedded default store: one SQLite file in WAL mode.
//!
//! Appends go through one writer task that owns one connection and commits
//! whatever has queued up in a single `BEGIN IMMEDIATE` transaction (group
//! commit): SQLite has one writer at a time anyway, and one fsync then covers
//! many publishes. `synchronous=FULL`, so a commit survives power loss.
//! Reads use a small pool; WAL lets them run beside the writer.

mod jobs;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{ReadMark, Seq};
use serde_json::value::RawValue;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

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
    let result = async {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        let mut outcomes = Vec::with_capacity(group.len());
        for (batch, _) in &group {
            let mut out = Vec::with_capacity(batch.len());
            for n in batch {
                out.push(append_one(conn, n).await?);
            }
            outcomes.push(out);
        }
        sqlx::query("COMMIT").execute(&mut *conn).await?;
        Ok::<_, sqlx::Error>(outcomes)
    }
    .await;
    match result {
        Ok(outcomes) => {
            for ((_, reply), out) in group.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            let err = StoreError::from(e);
            tracing::error!(error = %err, "group commit failed; nothing of it was stored");
            for (_, reply) in group {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

async fn append_one(conn: &mut SqliteConnection, n: &NewNotification) -> Result<Appended, sqlx::Error> {
    if let Some(key) = &n.idempotency_key {
        let earlier = sqlx::query(select!("WHERE user_id = ? AND idempotency_key = ?"))
            .bind(&*n.user_id)
            .bind(&**key)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = earlier {
            return Ok(Appended { notification: from_row(&n.user_id, &row)?, created: false });
        }
    }
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO users (user_id, last_seq) VALUES (?, 1)
         ON CONFLICT (user_id) DO UPDATE SET last_seq = last_seq + 1
         RETURNING last_seq",
    )
    .bind(&*n.user_id)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at, idempotency_key)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&*n.user_id)
    .bind(seq)
    .bind(&n.id)
    .bind(&*n.topic)
    .bind(n.payload.get())
    .bind(n.created_at_ms)
    .bind(n.idempotency_key.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(Appended {
        notification: StoredNotification {
            user_id: n.user_id.clone(),
            seq,
            id: n.id.clone(),
            topic: n.topic.clone(),
            payload: n.payload.clone(),
            created_at_ms: n.created_at_ms,
            read: false,
        },
        created: true,
    })
}

fn rows(user: &str, rows: Vec<SqliteRow>) -> Result<Vec<StoredNotification>, StoreError> {
    let user: Arc<str> = user.into();
    Ok(rows.iter().map(|r| from_row(&user, r)).collect::<Result<_, _>>()?)
}

#[async_trait]
impl Store for SqliteStore {
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
