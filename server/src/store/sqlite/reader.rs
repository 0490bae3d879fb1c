//! The reads of notifications — `head`, `after` (replay), `last_seqs` (the
//! repair pass) and `list` (the inbox) — on reader threads of their own,
//! each with its own connection (rusqlite, on the same SQLite library sqlx
//! links).
//!
//! Why not the sqlx pool: sqlx runs each SQLite connection on a worker
//! thread and hands every result row back through a channel, so a replay of
//! 50 rows cost dozens of thread wake-ups; in a reconnect storm those context
//! switches were the largest item of the profile. Here a request is one
//! hand-off each way: the caller queues it, a reader thread runs the whole
//! query and answers with every row at once. WAL lets the readers run beside
//! the writer; each statement reads one committed snapshot.
//!
//! The queue is bounded ([`QUEUE`]): when it is full, callers wait.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::Seq;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::store::{Head, ListQuery, SharedTopic, StoreError, StoredNotification};

/// Requests waiting for a reader thread.
const QUEUE: usize = 4096;
/// How long a reader waits for a lock (a checkpoint, a schema change).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Request {
    Head { user: Arc<str>, reply: Reply<Head> },
    After { user: Arc<str>, after: Seq, up_to: Seq, limit: u32, reply: Reply<Vec<StoredNotification>> },
    Resume { user: Arc<str>, since: Option<Seq>, limit: u32, reply: Reply<(Head, Vec<StoredNotification>)> },
    LastSeqs { users: Vec<Arc<str>>, reply: Reply<Vec<Seq>> },
    List { user: Arc<str>, query: ListQuery, reply: Reply<Vec<StoredNotification>> },
}

/// A handle on the reader threads; they end when the store closes.
pub(super) struct Readers {
    queue: async_channel::Sender<Request>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Readers {
    /// Opens connections to the database file at `path` (already created
    /// and migrated) and starts one thread on each: as many as the machine
    /// has cores (at least two), at most `max_threads`. Reads from a warm
    /// page cache are CPU work; more threads than cores only switch more
    /// (measured in docs/BENCHMARKS.md).
    pub fn start(path: PathBuf, max_threads: usize) -> Result<Readers, StoreError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        let threads = cores.min(max_threads);
        let (tx, rx) = async_channel::bounded(QUEUE);
        let readers = Readers { queue: tx, threads: Default::default() };
        for n in 0..threads.max(1) {
            let conn = open(&path)?;
            let rx = rx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("herald-sqlite-reader-{n}"))
                .spawn(move || serve(conn, rx))
                .map_err(|e| StoreError::Internal(format!("spawning a reader thread: {e}")))?;
            readers.threads.lock().expect("reader threads").push(thread);
        }
        Ok(readers)
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(request(reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    pub async fn head(&self, user: &str) -> Result<Head, StoreError> {
        let user = user.into();
        self.ask(|reply| Request::Head { user, reply }).await
    }

    pub async fn after(
        &self,
        user: &str,
        after: Seq,
        up_to: Seq,
        limit: u32,
    ) -> Result<Vec<StoredNotification>, StoreError> {
        let user = user.into();
        self.ask(|reply| Request::After { user, after, up_to, limit, reply }).await
    }

    /// [`crate::store::Store::resume`] in one hand-off.
    pub async fn resume(
        &self,
        user: &str,
        since: Option<Seq>,
        limit: u32,
    ) -> Result<(Head, Vec<StoredNotification>), StoreError> {
        let user = user.into();
        self.ask(|reply| Request::Resume { user, since, limit, reply }).await
    }

    pub async fn last_seqs(&self, users: &[Arc<str>]) -> Result<Vec<Seq>, StoreError> {
        let users = users.to_vec();
        self.ask(|reply| Request::LastSeqs { users, reply }).await
    }

    pub async fn list(&self, user: &str, query: &ListQuery) -> Result<Vec<StoredNotification>, StoreError> {
        let (user, query) = (user.into(), query.clone());
        self.ask(|reply| Request::List { user, query, reply }).await
    }

    /// Answers what is queued, refuses anything new, and waits until every
    /// reader thread has closed its connection.
    pub async fn close(&self) {
        self.queue.close();
        let threads = std::mem::take(&mut *self.threads.lock().expect("reader threads"));
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    }
}

impl Drop for Readers {
    /// A store dropped without `close` still ends its threads (they finish
    /// what is queued first).
    fn drop(&mut self) {
        self.queue.close();
    }
}

pub(super) fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// A connection to the (created, migrated) database file, for a thread of its own.
pub(super) fn open(path: &Path) -> Result<Connection, StoreError> {
    open_with(path, None)
}

/// The same, through the VFS named `vfs` (SQLite's default when `None`).
pub(super) fn open_with(path: &Path, vfs: Option<&str>) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match vfs {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    }
    .map_err(store_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(store_error)?;
    Ok(conn)
}

fn serve(conn: Connection, queue: async_channel::Receiver<Request>) {
    while let Ok(request) = queue.recv_blocking() {
        match request {
            Request::Head { user, reply } => {
                let _ = reply.send(head(&conn, &user).map_err(store_error));
            }
            Request::After { user, after, up_to, limit, reply } => {
                let _ = reply.send(notifications_after(&conn, &user, after, up_to, limit).map_err(store_error));
            }
            Request::Resume { user, since, limit, reply } => {
                let _ = reply.send(resume(&conn, &user, since, limit).map_err(store_error));
            }
            Request::LastSeqs { users, reply } => {
                let _ = reply.send(last_seqs(&conn, &users).map_err(store_error));
            }
            Request::List { user, query, reply } => {
                let _ = reply.send(list(&conn, &user, &query).map_err(store_error));
            }
        }
    }
}

fn head(conn: &Connection, user: &str) -> rusqlite::Result<Head> {
    let mut statement = conn.prepare_cached(
        "SELECT u.last_seq, (SELECT MIN(seq) FROM notifications n WHERE n.user_id = u.user_id)
         FROM users u WHERE u.user_id = ?",
    )?;
    let found: Option<(i64, Option<i64>)> = statement.query_row([user], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
    // A user without a counter row has had nothing stored: last seq 0.
    let (last_seq, oldest) = found.unwrap_or((0, None));
    Ok(Head::new(last_seq, oldest))
}

fn resume(
    conn: &Connection,
    user: &Arc<str>,
    since: Option<Seq>,
    limit: u32,
) -> rusqlite::Result<(Head, Vec<StoredNotification>)> {
    let Some(since) = since.filter(|_| limit > 0) else {
        return Ok((head(conn, user)?, Vec::new()));
    };
    let last_seq = last_seq(conn, user)?;
    let page = notifications_after(conn, user, since.min(last_seq), Seq::MAX, limit)?;
    Ok((Head::resumed(last_seq, page.first().map(|n| n.seq)), page))
}

/// `SELECT` of the columns [`NotificationColumns`] decodes, then `rest`.
macro_rules! select {
    ($rest:expr) => {
        concat!("SELECT seq, id, topic, payload, created_at, read FROM notifications ", $rest)
    };
}

fn notifications_after(
    conn: &Connection,
    user: &Arc<str>,
    after: Seq,
    up_to: Seq,
    limit: u32,
) -> rusqlite::Result<Vec<StoredNotification>> {
    let mut statement =
        conn.prepare_cached(select!("WHERE user_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"))?;
    let found = decode_all(user, statement.query((&**user, after, up_to, limit))?);
    found
}

/// The inbox listing: newest first, along the primary key (the user's
/// notifications by seq), keeping the unread ones or one topic's when asked.
/// Unread ones are looked for above the user's read floor only (below it
/// all are read), so a page of them never walks the history below the
/// user's last "mark all read".
fn list(conn: &Connection, user: &Arc<str>, q: &ListQuery) -> rusqlite::Result<Vec<StoredNotification>> {
    let mut statement = conn.prepare_cached(select!(concat!(
        "WHERE user_id = ?1 AND seq < ?2 AND seq > MAX(?3, CASE WHEN ?4 THEN ",
        read_floor_of_user_1!(),
        " ELSE 0 END) AND (read = 0 OR ?4 = 0) AND (?5 IS NULL OR topic = ?5) ORDER BY seq DESC LIMIT ?6"
    )))?;
    let (before, after) = (q.before_seq.unwrap_or(Seq::MAX), q.after_seq.unwrap_or(0));
    let found =
        decode_all(user, statement.query((&**user, before, after, q.unread_only, q.topic.as_deref(), q.limit))?);
    found
}

fn decode_all(user: &Arc<str>, mut rows: rusqlite::Rows<'_>) -> rusqlite::Result<Vec<StoredNotification>> {
    let mut columns = NotificationColumns::default();
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        found.push(columns.decode(user, row)?);
    }
    Ok(found)
}

/// Decodes rows of `SELECT seq, id, topic, payload, created_at, read`.
#[derive(Default)]
pub(super) struct NotificationColumns {
    topic: SharedTopic,
}

impl NotificationColumns {
    pub fn decode(&mut self, user: &Arc<str>, row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredNotification> {
        let topic = self.topic.of(row.get_ref(2)?.as_str()?);
        let payload = RawValue::from_string(row.get(3)?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e)))?;
        Ok(StoredNotification {
            user_id: user.clone(),
            seq: row.get(0)?,
            id: row.get(1)?,
            topic,
            payload: Arc::from(payload),
            created_at_ms: row.get(4)?,
            read: row.get::<_, i64>(5)? != 0,
        })
    }
}

fn last_seqs(conn: &Connection, users: &[Arc<str>]) -> rusqlite::Result<Vec<Seq>> {
    users.iter().map(|user| last_seq(conn, user)).collect()
}

/// The user's newest committed seq (0 for a user with none).
fn last_seq(conn: &Connection, user: &str) -> rusqlite::Result<Seq> {
    let mut statement = conn.prepare_cached("SELECT last_seq FROM users WHERE user_id = ?")?;
    Ok(statement.query_row([user], |r| r.get(0)).optional()?.unwrap_or(0))
}

pub(super) fn store_error(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(ref failure, _) if super::is_unavailable(failure.extended_code) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}
