//! Batched replay reads: when many sessions reconnect at once, each asks for
//! its `head` and what it missed (`after`). One task gathers whatever is
//! queued (up to [`MAX_BATCH`] requests) and answers the whole batch with one
//! query per kind; at most `in_flight` batches run at once, and while they
//! do, the next batch grows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::Seq;
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::from_row;
use crate::store::{Head, StoreError, StoredNotification};

/// Most requests answered by one batch.
const MAX_BATCH: usize = 256;
/// Requests waiting for a batch; a full queue makes readers wait.
pub(super) const QUEUE: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) struct AfterQuery {
    pub user: Arc<str>,
    pub after: Seq,
    pub up_to: Seq,
    pub limit: u32,
}

pub(super) enum Request {
    Head { user: Arc<str>, reply: Reply<Head> },
    After { query: AfterQuery, reply: Reply<Vec<StoredNotification>> },
}

/// Gathers batches until the store closes, then answers what is queued and
/// waits for the batches still running.
pub(super) async fn run(
    pool: PgPool,
    mut queue: mpsc::Receiver<Request>,
    closing: CancellationToken,
    in_flight: usize,
    deadline: Duration,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
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
        let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Ok(next) = queue.try_recv() else { break };
            batch.push(next);
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            answer(&pool, batch, deadline).await;
            drop(permit);
        });
    }
    let _ = permits.acquire_many(in_flight as u32).await;
}

async fn answer(pool: &PgPool, batch: Vec<Request>, deadline: Duration) {
    let mut heads = Vec::new();
    let mut afters = Vec::new();
    for request in batch {
        match request {
            Request::Head { user, reply } => heads.push((user, reply)),
            Request::After { query, reply } => afters.push((query, reply)),
        }
    }
    if !heads.is_empty() {
        let users: Vec<&str> = heads.iter().map(|(u, _)| &**u).collect();
        match within(deadline, heads_of(pool, &users)).await {
            Ok(found) => {
                for (user, reply) in heads {
                    let _ = reply.send(Ok(found.get(&*user).copied().unwrap_or(Head { last_seq: 0, oldest_seq: 1 })));
                }
            }
            Err(e) => heads.into_iter().for_each(|(_, reply)| drop(reply.send(Err(e.clone())))),
        }
    }
    if !afters.is_empty() {
        let queries: Vec<&AfterQuery> = afters.iter().map(|(q, _)| q).collect();
        match within(deadline, afters_of(pool, &queries)).await {
            Ok(found) => {
                for ((_, reply), found) in afters.into_iter().zip(found) {
                    let _ = reply.send(Ok(found));
                }
            }
            Err(e) => afters.into_iter().for_each(|(_, reply)| drop(reply.send(Err(e.clone())))),
        }
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

/// The head of every user that has a counter row.
async fn heads_of(pool: &PgPool, users: &[&str]) -> Result<HashMap<String, Head>, sqlx::Error> {
    let found = sqlx::query(
        "SELECT u.user_id, u.last_seq,
                (SELECT MIN(n.seq) FROM notifications n WHERE n.user_id = u.user_id) AS oldest
         FROM users u WHERE u.user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(pool)
    .await?;
    let mut heads = HashMap::with_capacity(found.len());
    for row in found {
        let last_seq: i64 = row.try_get("last_seq")?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        heads.insert(row.try_get("user_id")?, Head { last_seq, oldest_seq: oldest.unwrap_or(last_seq + 1) });
    }
    Ok(heads)
}

/// The answer to each query, in the order of `queries`.
async fn afters_of(pool: &PgPool, queries: &[&AfterQuery]) -> Result<Vec<Vec<StoredNotification>>, sqlx::Error> {
    let users: Vec<&str> = queries.iter().map(|q| &*q.user).collect();
    let afters: Vec<i64> = queries.iter().map(|q| q.after).collect();
    let up_tos: Vec<i64> = queries.iter().map(|q| q.up_to).collect();
    let limits: Vec<i64> = queries.iter().map(|q| i64::from(q.limit)).collect();
    let found = sqlx::query(
        "SELECT q.i, n.seq, n.id, n.topic, n.payload, n.created_at, n.read
         FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[]) WITH ORDINALITY AS q(u, a, t, l, i)
         CROSS JOIN LATERAL (
             SELECT seq, id, topic, payload, created_at, read FROM notifications
             WHERE user_id = q.u AND seq > q.a AND seq <= q.t
             ORDER BY seq LIMIT q.l
         ) n
         ORDER BY q.i, n.seq",
    )
    .bind(&users)
    .bind(&afters)
    .bind(&up_tos)
    .bind(&limits)
    .fetch_all(pool)
    .await?;
    let mut answers: Vec<Vec<StoredNotification>> = queries.iter().map(|_| Vec::new()).collect();
    for row in found {
        let i: i64 = row.try_get("i")?;
        let index = usize::try_from(i - 1).ok().filter(|&i| i < queries.len());
        let index = index.ok_or_else(|| sqlx::Error::Protocol(format!("batched read answered unknown query {i}")))?;
        answers[index].push(from_row(&queries[index].user, &row)?);
    }
    Ok(answers)
}
