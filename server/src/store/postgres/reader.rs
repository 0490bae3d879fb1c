//! Batched replay reads: when many sessions reconnect at once, each asks for
//! its head and the first page of what it missed (`resume`; `head` is a
//! resume without a page), and later pages (`after`). One task gathers whatever is queued (up to [`MAX_BATCH`]
//! requests) and answers the whole batch with one query per kind; at most
//! `in_flight` batches run at once, and while they do, the next batch grows.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use herald_protocol::Seq;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Columns;
use crate::store::{Head, StoreError, StoredNotification};

/// Most requests answered by one batch.
const MAX_BATCH: usize = 256;
/// Longest a batch waits for a running one to finish before it starts anyway.
const MAX_GROW: Duration = Duration::from_millis(50);
/// Requests waiting for a batch; a full queue makes readers wait.
pub(super) const QUEUE: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) struct AfterQuery {
    pub user: Arc<str>,
    pub after: Seq,
    pub up_to: Seq,
    pub limit: u32,
}

pub(super) struct ResumeQuery {
    pub user: Arc<str>,
    pub since: Option<Seq>,
    pub limit: u32,
}

pub(super) enum Request {
    After { query: AfterQuery, reply: Reply<Vec<StoredNotification>> },
    Resume { query: ResumeQuery, reply: Reply<(Head, Vec<StoredNotification>)> },
}

/// Gathers batches until the store closes, then answers what is queued and
/// waits for the batches still running.
///
/// A request that finds nothing running goes at once, alone if need be.
/// One that finds a batch running waits for it to finish, for its own batch
/// to fill, or [`MAX_GROW`], whichever comes first, before its batch
/// starts: in a reconnect storm each statement then carries many reconnects
/// rather than a handful, and each statement has a fixed cost in PostgreSQL
/// (docs/BENCHMARKS.md: 3,591 statements for 19,800 reconnects before, 1,787
/// after), while a batch stuck on a slow statement holds the others up by
/// [`MAX_GROW`] at most.
pub(super) async fn run(
    pool: PgPool,
    mut queue: mpsc::Receiver<Request>,
    closing: CancellationToken,
    in_flight: usize,
    deadline: Duration,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    let finished = Arc::new(Notify::new());
    loop {
        let first = tokio::select! {
            biased;
            request = queue.recv() => request,
            _ = closing.cancelled() => {
                queue.close();
                queue.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        take_queued(&mut queue, &mut batch);
        let grown = tokio::time::Instant::now() + MAX_GROW;
        while batch.len() < MAX_BATCH && permits.available_permits() < in_flight {
            tokio::select! {
                biased;
                _ = finished.notified() => break,
                _ = closing.cancelled() => break,
                _ = tokio::time::sleep_until(grown) => break,
                request = queue.recv() => match request {
                    Some(request) => {
                        batch.push(request);
                        take_queued(&mut queue, &mut batch);
                    }
                    None => break,
                },
            }
        }
        let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let pool = pool.clone();
        let finished = finished.clone();
        tokio::spawn(async move {
            answer(&pool, batch, deadline).await;
            drop(permit);
            finished.notify_one();
        });
    }
    let _ = permits.acquire_many(in_flight as u32).await;
}

/// Adds what is queued to `batch`, up to [`MAX_BATCH`].
fn take_queued(queue: &mut mpsc::Receiver<Request>, batch: &mut Vec<Request>) {
    while batch.len() < MAX_BATCH {
        let Ok(next) = queue.try_recv() else { break };
        batch.push(next);
    }
}

async fn answer(pool: &PgPool, batch: Vec<Request>, deadline: Duration) {
    let mut afters = Vec::new();
    let mut resumes = Vec::new();
    for request in batch {
        match request {
            Request::After { query, reply } => afters.push((query, reply)),
            Request::Resume { query, reply } => resumes.push((query, reply)),
        }
    }
    if !resumes.is_empty() {
        let queries: Vec<&ResumeQuery> = resumes.iter().map(|(q, _)| q).collect();
        let found = within(deadline, resumes_of(pool, &queries)).await;
        reply_each(resumes, found);
    }
    if !afters.is_empty() {
        let queries: Vec<&AfterQuery> = afters.iter().map(|(q, _)| q).collect();
        let found = within(deadline, afters_of(pool, &queries)).await;
        reply_each(afters, found);
    }
}

/// Sends each request its answer (in the order of `requests`), or every one the error.
fn reply_each<Q, T>(requests: Vec<(Q, Reply<T>)>, found: Result<Vec<T>, StoreError>) {
    match found {
        Ok(found) => {
            for ((_, reply), found) in requests.into_iter().zip(found) {
                let _ = reply.send(Ok(found));
            }
        }
        Err(e) => requests.into_iter().for_each(|(_, reply)| drop(reply.send(Err(e.clone())))),
    }
}

async fn within<T>(
    deadline: Duration,
    query: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, query).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Unavailable("the read timed out".into())),
    }
}

/// The answer to each resume, in the order of `queries`: the user's head
/// and the first `limit` notifications after `since`, from one statement,
/// so from one snapshot — no seq beyond the head it read can be in the
/// page. A user without a counter row has `last_seq` 0. Without `since`
/// (or with a `limit` of 0) the page is empty and the head's `oldest_seq`
/// is looked up; with both, it is the page's first seq ([`Head::resumed`]),
/// which spares the statement an index descent and a heap read per user
/// (about a tenth of its time; docs/BENCHMARKS.md).
async fn resumes_of(
    pool: &PgPool,
    queries: &[&ResumeQuery],
) -> Result<Vec<(Head, Vec<StoredNotification>)>, sqlx::Error> {
    let users: Vec<&str> = queries.iter().map(|q| &*q.user).collect();
    let sinces: Vec<Option<i64>> = queries.iter().map(|q| q.since).collect();
    let limits: Vec<i64> = queries.iter().map(|q| if q.since.is_some() { i64::from(q.limit) } else { 0 }).collect();
    let mut found = sqlx::query(
        "SELECT q.i, h.last_seq, h.oldest, n.seq, n.id, n.topic, n.payload, n.created_at, n.read
         FROM UNNEST($1::text[], $2::int8[], $3::int8[]) WITH ORDINALITY AS q(u, s, l, i)
         LEFT JOIN LATERAL (
             SELECT u.last_seq,
                    CASE WHEN q.l = 0 THEN
                        (SELECT MIN(m.seq) FROM notifications m WHERE m.user_id = u.user_id)
                    END AS oldest
             FROM users u WHERE u.user_id = q.u
         ) h ON true
         LEFT JOIN LATERAL (
             SELECT seq, id, topic, payload, created_at, read FROM notifications
             WHERE user_id = q.u AND seq > q.s
             ORDER BY seq LIMIT q.l
         ) n ON true",
    )
    .bind(&users)
    .bind(&sinces)
    .bind(&limits)
    .fetch(pool);
    let mut answers: Vec<Option<(Found, Vec<StoredNotification>)>> = queries.iter().map(|_| None).collect();
    let mut columns = Columns::from(3);
    while let Some(row) = found.try_next().await? {
        let index = answer_index(&row, queries.len())?;
        if answers[index].is_none() {
            answers[index] = Some((found_head(&row)?, Vec::new()));
        }
        let (_, page) = answers[index].as_mut().expect("set above");
        if row.try_get::<Option<i64>, _>(3)?.is_some() {
            page.push(columns.decode(&queries[index].user, &row)?);
        }
    }
    answers
        .into_iter()
        .zip(&limits)
        .map(|(a, &limit)| {
            let (found, mut page) =
                a.ok_or_else(|| sqlx::Error::Protocol("a batched resume went unanswered".into()))?;
            in_seq_order(&mut page);
            let head = match limit {
                0 => Head::new(found.last_seq, found.oldest),
                _ => Head::resumed(found.last_seq, page.first().map(|n| n.seq)),
            };
            Ok((head, page))
        })
        .collect()
}

/// A resume row's head columns: `last_seq` (0 without a counter row) and
/// `oldest` (looked up only for a resume without a page; null when nothing
/// is retained).
struct Found {
    last_seq: Seq,
    oldest: Option<Seq>,
}

fn found_head(row: &PgRow) -> Result<Found, sqlx::Error> {
    Ok(Found { last_seq: row.try_get::<Option<i64>, _>(1)?.unwrap_or(0), oldest: row.try_get(2)? })
}

/// The statements above leave out an outer `ORDER BY`: sorting every
/// batch's rows (payloads and all) cost PostgreSQL about a quarter of the
/// statement (docs/BENCHMARKS.md). Each page is picked in seq order by its
/// own `ORDER BY seq LIMIT`, and arrives so from the nested loop, but SQL
/// promises no order without the outer clause: each page is put in order
/// here, which costs one pass when it already is.
fn in_seq_order(page: &mut [StoredNotification]) {
    page.sort_by_key(|n| n.seq);
}

/// Which query of the batch (`q.i`, from 1, the first column) a row answers, as an index.
fn answer_index(row: &PgRow, queries: usize) -> Result<usize, sqlx::Error> {
    let i: i64 = row.try_get(0)?;
    usize::try_from(i - 1)
        .ok()
        .filter(|&i| i < queries)
        .ok_or_else(|| sqlx::Error::Protocol(format!("batched read answered unknown query {i}")))
}

/// The answer to each query, in the order of `queries`.
async fn afters_of(pool: &PgPool, queries: &[&AfterQuery]) -> Result<Vec<Vec<StoredNotification>>, sqlx::Error> {
    let users: Vec<&str> = queries.iter().map(|q| &*q.user).collect();
    let afters: Vec<i64> = queries.iter().map(|q| q.after).collect();
    let up_tos: Vec<i64> = queries.iter().map(|q| q.up_to).collect();
    let limits: Vec<i64> = queries.iter().map(|q| i64::from(q.limit)).collect();
    let mut found = sqlx::query(
        "SELECT q.i, n.seq, n.id, n.topic, n.payload, n.created_at, n.read
         FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[]) WITH ORDINALITY AS q(u, a, t, l, i)
         CROSS JOIN LATERAL (
             SELECT seq, id, topic, payload, created_at, read FROM notifications
             WHERE user_id = q.u AND seq > q.a AND seq <= q.t
             ORDER BY seq LIMIT q.l
         ) n",
    )
    .bind(&users)
    .bind(&afters)
    .bind(&up_tos)
    .bind(&limits)
    .fetch(pool);
    let mut answers: Vec<Vec<StoredNotification>> = queries.iter().map(|_| Vec::new()).collect();
    let mut columns = Columns::from(1);
    while let Some(row) = found.try_next().await? {
        let index = answer_index(&row, queries.len())?;
        answers[index].push(columns.decode(&queries[index].user, &row)?);
    }
    answers.iter_mut().for_each(|page| in_seq_order(page));
    Ok(answers)
}
