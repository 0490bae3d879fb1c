//! Group commit: a few writer tasks share one bounded queue of appends; each
//! takes whatever is queued (up to [`MAX_GROUP`] notifications) and commits
//! it in one transaction:
//!
//! 1. `BEGIN`
//! 2. upsert-and-lock the counter rows of the group's users, sorted;
//! 3. (only when a key is present) look up the idempotency keys — after the
//!    locks, so a key committed by another node just before is seen;
//! 4. one statement inserting every new notification and writing back the
//!    counters;
//! 5. `COMMIT`.
//!
//! **Taking turns.** While one group commits, the next writer waits with
//! the request at the head of the queue, and starts once that commit ends
//! or has run for [`PATIENCE`], taking everything queued meanwhile. With
//! commits of a millisecond or two the writers so commit one group after
//! another, each as large as what arrived during the one before: fewer,
//! larger transactions than writers starting side by side, each with its
//! own statement and WAL flush (at 5,000 single-user publishes/s on the
//! two-core box, a third less PostgreSQL CPU and a lower p50 and p99;
//! docs/BENCHMARKS.md, "Fix: one group commit at a time"). A slow commit — a
//! thousand-user batch, a counter row another node holds locked — holds up
//! the requests behind it for at most [`PATIENCE`]: then another writer
//! commits them beside it.
//!
//! A group without idempotency keys (the usual case) needs no step 3, and
//! steps 2 and 4 become one statement ([`transact_unkeyed`]). One statement
//! is a transaction of its own, so on a connection known to be alive that
//! statement is the whole commit: one round trip per group instead of four.
//!
//! Each writer keeps its connection from one group to the next (when the
//! pool has room for that): sqlx pings a connection when it leaves the pool
//! and again when it comes back, two round trips per group on top of these.
//! A kept connection that has been idle longer than [`FRESH`] may have died
//! meanwhile (PostgreSQL restarted), so its group starts with `BEGIN`: one
//! found dead there is swapped for a fresh one and the group begun again,
//! since nothing of it had run. A connection used within [`FRESH`] skips
//! that check, as pgx's pool does; if it dies under the statement, the
//! outcome is unknown and every request of the group gets an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, Mutex, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Columns;
use crate::store::plan::{Key, Plan, Rows};
use crate::store::{Appended, CommitLog, GroupCommits, NewNotification, StoreError, StoredNotification};

/// Most notifications committed in one group transaction (a single larger
/// request still commits whole, alone).
const MAX_GROUP: usize = 2048;
/// Requests waiting for a writer; a full queue makes publishers wait.
pub(super) const QUEUE: usize = 1024;
/// Attempts of a group that lost a deadlock or serialization conflict.
const ATTEMPTS: u32 = 4;
/// A kept connection last used this recently is taken to be alive: its
/// unkeyed groups commit as one statement, without a `BEGIN` to probe it.
const FRESH: Duration = Duration::from_secs(1);
/// How long the next group waits for the one committing before it starts
/// beside it (the module doc, "Taking turns").
const PATIENCE: Duration = Duration::from_millis(5);

pub(super) struct Request {
    pub batch: Vec<NewNotification>,
    pub reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
}

/// What every writer task shares.
#[derive(Clone)]
pub(super) struct Writers {
    pool: PgPool,
    read_only: super::ReadOnlySeen,
    /// One queue, many consumers: the writer holding the lock waits for the
    /// next request, takes what follows it, and lets go before committing.
    queue: Arc<Mutex<mpsc::Receiver<Request>>>,
    closing: CancellationToken,
    deadline: Duration,
    /// Whether a writer keeps its connection between groups.
    hold: bool,
    /// One record of the groups for all the writers: an outage is logged
    /// once per node, not once per writer.
    log: Arc<std::sync::Mutex<CommitLog>>,
    turns: Arc<Turns>,
}

/// The groups committing now: when the next one may start.
struct Turns {
    in_flight: std::sync::Mutex<InFlight>,
    ended: Notify,
    /// [`PATIENCE`], but for tests.
    patience: Duration,
}

#[derive(Default)]
struct InFlight {
    groups: usize,
    /// When the group started last began.
    newest: Option<Instant>,
}

impl Turns {
    fn new(patience: Duration) -> Arc<Turns> {
        Arc::new(Turns { in_flight: Default::default(), ended: Notify::new(), patience })
    }

    /// The groups in flight (a panic elsewhere while they were held leaves
    /// them usable: the count is only changed in whole steps).
    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns once no group is committing, or the one started last has
    /// been at it for [`PATIENCE`].
    async fn wait(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let since = {
                let in_flight = self.in_flight();
                match in_flight.newest {
                    Some(since) if in_flight.groups > 0 => since,
                    _ => return,
                }
            };
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep_until(since + self.patience) => return,
            }
        }
    }

    /// Counts a group in flight until the returned guard drops.
    fn begin(self: &Arc<Self>) -> Committing {
        let mut in_flight = self.in_flight();
        in_flight.groups += 1;
        in_flight.newest = Some(Instant::now());
        Committing(self.clone())
    }
}

/// A group in flight; dropping it ends its turn.
struct Committing(Arc<Turns>);

impl Drop for Committing {
    fn drop(&mut self) {
        let mut in_flight = self.0.in_flight();
        in_flight.groups -= 1;
        drop(in_flight);
        self.0.ended.notify_waiters();
    }
}

/// A writer's connection between groups, and when it last answered.
type Held = Option<(PoolConnection<Postgres>, Instant)>;

impl Writers {
    /// `hold`: each writer keeps a connection; only when the pool has
    /// others for the readers. Each group is recorded in `metrics`.
    pub fn new(
        pool: PgPool,
        read_only: super::ReadOnlySeen,
        queue: mpsc::Receiver<Request>,
        closing: CancellationToken,
        deadline: Duration,
        hold: bool,
        metrics: GroupCommits,
    ) -> Self {
        let log = Arc::new(std::sync::Mutex::new(CommitLog::new(metrics)));
        let turns = Turns::new(PATIENCE);
        Writers { pool, read_only, queue: Arc::new(Mutex::new(queue)), closing, deadline, hold, log, turns }
    }

    /// The writers' shared record of their groups (a panic elsewhere while
    /// it was held leaves it usable: it only counts and logs).
    fn log(&self) -> std::sync::MutexGuard<'_, CommitLog> {
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits groups until the store closes and the queue is drained.
    pub async fn run(self) {
        let mut held = None;
        while let Some((group, turn)) = self.next_group().await {
            self.commit_group(group, turn, &mut held).await;
            if !self.hold {
                held = None;
            }
        }
    }

    /// The next group, once it is its turn (the module doc, "Taking turns").
    async fn next_group(&self) -> Option<(Vec<Request>, Committing)> {
        let mut queue = self.queue.lock().await;
        let first = tokio::select! {
            biased;
            request = queue.recv() => request,
            _ = self.closing.cancelled() => {
                // Refuse new appends, but commit what is already queued.
                queue.close();
                queue.recv().await
            }
        }?;
        // Holding the queue: what arrives meanwhile joins this group.
        self.turns.wait().await;
        let mut size = first.batch.len();
        let mut group = vec![first];
        while size < MAX_GROUP {
            let Ok(next) = queue.try_recv() else { break };
            size += next.batch.len();
            group.push(next);
        }
        Some((group, self.turns.begin()))
    }

    async fn commit_group(&self, group: Vec<Request>, turn: Committing, held: &mut Held) {
        let (batches, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|r| (r.batch, r.reply)).unzip();
        let notifications = batches.iter().map(Vec::len).sum();
        let began = Instant::now();
        let result =
            match tokio::time::timeout(self.deadline, commit_with_retry(&self.pool, &self.read_only, held, &batches))
                .await
            {
                Ok(result) => result,
                Err(_) => {
                    Err(StoreError::Unavailable("the append timed out; it may or may not have been stored".into()))
                }
            };
        drop(turn);
        match result {
            Ok(outcomes) => {
                self.log().committed(notifications, began.elapsed());
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                self.log().failed(&err, notifications);
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

async fn commit_with_retry(
    pool: &PgPool,
    read_only: &super::ReadOnlySeen,
    held: &mut Held,
    batches: &[Vec<NewNotification>],
) -> Result<Vec<Vec<Appended>>, StoreError> {
    let mut attempt = 1;
    loop {
        match commit_on_held(pool, held, batches).await {
            Err(e) if attempt < ATTEMPTS && is_conflict(&e) => {
                tracing::debug!(error = %e, attempt, "group commit conflicted; retrying");
                tokio::time::sleep(Duration::from_millis(rand::random_range(1..10) * u64::from(attempt))).await;
                attempt += 1;
            }
            // A read-only refusal is noted, so the pool lets go of every
            // connection opened before it (`commit_on_held` closed this one).
            result => return result.map_err(|e| read_only.error(e)),
        }
    }
}

/// Deadlock or serialization failure: nothing was stored, and trying again
/// will likely succeed.
fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// Where a group's transaction failed.
enum Failed {
    /// At `BEGIN`: nothing of the group ran.
    Begin(sqlx::Error),
    After(sqlx::Error),
}

/// Commits on the held connection (taking one from the pool when none is
/// held), and keeps it if the commit succeeded. A held connection that
/// fails at `BEGIN` is dropped and the group begun once more on a fresh one.
/// A connection whose server refused the write as read-only (a standby, or
/// a primary being failed over) is closed, so the next group connects anew
/// and may reach the new primary. After any other failure the connection
/// goes back to the pool, whose check on return closes it if it is broken.
async fn commit_on_held(
    pool: &PgPool,
    held: &mut Held,
    batches: &[Vec<NewNotification>],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    let (mut conn, was_held, alive) = match held.take() {
        Some((conn, used)) => (conn, true, used.elapsed() < FRESH),
        None => (pool.acquire().await?, false, true),
    };
    let result = match commit(&mut conn, batches, alive).await {
        Err(Failed::Begin(e)) if was_held => {
            tracing::debug!(error = %e, "a kept connection failed at BEGIN; taking a fresh one");
            drop(conn);
            conn = pool.acquire().await?;
            commit(&mut conn, batches, true).await
        }
        result => result,
    };
    match result {
        Ok(outcomes) => {
            *held = Some((conn, Instant::now()));
            Ok(outcomes)
        }
        Err(Failed::Begin(e) | Failed::After(e)) => {
            if super::is_read_only(&e) {
                conn.close_on_drop();
            }
            Err(e)
        }
    }
}

/// `alive`: the connection just came from the pool (which checked it) or
/// answered within [`FRESH`].
async fn commit(
    conn: &mut PgConnection,
    batches: &[Vec<NewNotification>],
    alive: bool,
) -> Result<Vec<Vec<Appended>>, Failed> {
    if alive && unkeyed(batches) {
        // PostgreSQL commits the statement when it ends; an error, connection
        // loss included, leaves the outcome unknown, as a failed COMMIT does.
        return transact_unkeyed(conn, batches).await.map_err(Failed::After);
    }
    let mut tx = conn.begin().await.map_err(Failed::Begin)?;
    let outcomes = transact(&mut tx, batches).await.map_err(Failed::After)?;
    // An error here, connection loss included, is an error to the caller:
    // the outcome is unknown, so it is never reported as stored.
    tx.commit().await.map_err(Failed::After)?;
    Ok(outcomes)
}

/// Steps 2–4 of the module doc; without idempotency keys, [`transact_unkeyed`].
async fn transact(
    tx: &mut Transaction<'_, Postgres>,
    batches: &[Vec<NewNotification>],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    if unkeyed(batches) {
        return transact_unkeyed(tx, batches).await;
    }
    let mut users: Vec<&str> = batches.iter().flatten().map(|n| &*n.user_id).collect();
    users.sort_unstable();
    users.dedup();
    // `DO UPDATE` (rather than `DO NOTHING`) locks existing rows until
    // COMMIT, in the order of `ORDER BY`; the same order on every node.
    let counters: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO users (user_id, last_seq)
         SELECT u, 0 FROM UNNEST($1::text[]) AS u ORDER BY u
         ON CONFLICT (user_id) DO UPDATE SET last_seq = users.last_seq
         RETURNING user_id, last_seq",
    )
    .bind(&users)
    .fetch_all(&mut **tx)
    .await?;
    let earlier = earlier_keys(tx, batches).await?;
    let plan = Plan::new(batches, counters.into_iter().collect(), earlier)?;
    if !plan.rows.users.is_empty() {
        write(&plan, tx).await?;
    }
    Ok(plan.outcomes)
}

fn unkeyed(batches: &[Vec<NewNotification>]) -> bool {
    batches.iter().flatten().all(|n| n.idempotency_key.is_none())
}

/// A group without idempotency keys stores every notification, so steps 2
/// and 4 are one statement: the upsert locks each counter row (sorted, as
/// in step 2) and adds the user's count in this group to it; the insert
/// numbers each notification back from the new `last_seq`. `k` is how many
/// of the user's notifications follow it in the group, so the seqs are
/// `last_seq - k`: the old `last_seq + 1`, `+ 2`, … in request order, which
/// is what [`Plan::new`] then answers from the old values.
async fn transact_unkeyed(
    conn: &mut PgConnection,
    batches: &[Vec<NewNotification>],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for n in batches.iter().flatten() {
        *counts.entry(&n.user_id).or_default() += 1;
    }
    // `k`, in the seqs column: how many of the user's notifications are left after this one.
    let mut rows = Rows::default();
    let mut left = counts.clone();
    for n in batches.iter().flatten() {
        let k = left.get_mut(&*n.user_id).expect("counted above");
        *k -= 1;
        rows.push(n, *k);
    }
    let mut users: Vec<(&str, i64)> = counts.iter().map(|(u, c)| (*u, *c)).collect();
    users.sort_unstable();
    let (users, added): (Vec<&str>, Vec<i64>) = users.into_iter().unzip();
    let query = sqlx::query(
        "WITH bumped AS (
             INSERT INTO users (user_id, last_seq)
             SELECT * FROM UNNEST($1::text[], $2::int8[]) ORDER BY 1
             ON CONFLICT (user_id) DO UPDATE SET last_seq = users.last_seq + excluded.last_seq
             RETURNING user_id, last_seq
         ), inserted AS (
             INSERT INTO notifications (user_id, seq, id, topic, payload, created_at)
             SELECT n.u, b.last_seq - n.k, n.id, n.topic, n.payload, n.created
             FROM UNNEST($3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::int8[])
                  AS n(u, k, id, topic, payload, created)
             JOIN bumped b ON b.user_id = n.u
         )
         SELECT user_id, last_seq FROM bumped",
    )
    .bind(&users)
    .bind(&added);
    let mut before = HashMap::with_capacity(users.len());
    for row in bind_rows(query, &rows).fetch_all(&mut *conn).await? {
        let user: String = row.try_get(0)?;
        let last: i64 = row.try_get(1)?;
        let added = counts.get(&*user).copied().unwrap_or(0);
        before.insert(user, last - added);
    }
    Ok(Plan::new(batches, before, HashMap::new())?.outcomes)
}

/// The stored notifications whose (user, idempotency key) the group repeats.
async fn earlier_keys(
    tx: &mut Transaction<'_, Postgres>,
    batches: &[Vec<NewNotification>],
) -> Result<HashMap<Key, StoredNotification>, sqlx::Error> {
    let (users, keys): (Vec<&str>, Vec<&str>) =
        batches.iter().flatten().filter_map(|n| n.idempotency_key.as_deref().map(|k| (&*n.user_id, k))).unzip();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found = sqlx::query(
        "SELECT n.user_id, n.idempotency_key, n.seq, n.id, n.topic, n.payload, n.created_at, n.read
         FROM UNNEST($1::text[], $2::text[]) AS k(u, key)
         JOIN notifications n ON n.user_id = k.u AND n.idempotency_key = k.key",
    )
    .bind(&users)
    .bind(&keys)
    .fetch_all(&mut **tx)
    .await?;
    let mut earlier = HashMap::with_capacity(found.len());
    let mut columns = Columns::from(2);
    for row in found {
        let user: Arc<str> = row.try_get::<&str, _>(0)?.into();
        let key: Arc<str> = row.try_get::<&str, _>(1)?.into();
        earlier.insert((user.clone(), key), columns.decode(&user, &row)?);
    }
    Ok(earlier)
}

/// Inserts the new notifications and advances the counters: one statement.
///
/// The counters are written with an upsert on rows that exist (step 2
/// created and locked them), not `UPDATE … FROM UNNEST(…)`: the planner
/// cannot see how long the array is, and against a users table of a few
/// thousand rows it joined by scanning all of it, once per commit (67
/// million rows read in a 30 s benchmark, docs/BENCHMARKS.md). An upsert
/// finds each row through the primary key whatever the table's size.
async fn write(plan: &Plan<'_>, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    let (users, last_seqs): (Vec<&str>, Vec<i64>) = plan.counters.iter().map(|(u, s)| (*u, *s)).unzip();
    let rows = &plan.rows;
    let query = sqlx::query(
        "WITH inserted AS (
             INSERT INTO notifications (user_id, seq, id, topic, payload, created_at, idempotency_key)
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::text[])
         )
         INSERT INTO users (user_id, last_seq)
         SELECT * FROM UNNEST($8::text[], $9::int8[])
         ON CONFLICT (user_id) DO UPDATE SET last_seq = excluded.last_seq",
    );
    bind_rows(query, rows).bind(&rows.keys).bind(&users).bind(&last_seqs).execute(&mut **tx).await?;
    Ok(())
}

/// Binds the new rows' columns, in this order: user, seq, id, topic,
/// payload, created_at.
fn bind_rows<'q>(query: Query<'q, Postgres, PgArguments>, rows: &'q Rows<'_>) -> Query<'q, Postgres, PgArguments> {
    query.bind(&rows.users).bind(&rows.seqs).bind(&rows.ids).bind(&rows.topics).bind(&rows.payloads).bind(&rows.created)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn finishes<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f).await.expect("it never returned")
    }

    #[tokio::test]
    async fn the_next_group_waits_for_the_one_committing_to_end() {
        let turns = Turns::new(Duration::from_secs(3600));
        finishes(turns.wait()).await; // nothing in flight
        let first = turns.begin();
        let second = turns.begin();
        let waiter = tokio::spawn({
            let turns = turns.clone();
            async move { turns.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "started while two groups were committing");
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "started while a group was committing");
        drop(second);
        finishes(waiter).await.unwrap();
    }

    #[tokio::test]
    async fn a_slow_commit_holds_the_next_group_for_its_patience_only() {
        let turns = Turns::new(Duration::from_millis(200));
        let _slow = turns.begin();
        let began = Instant::now();
        finishes(turns.wait()).await;
        assert!(began.elapsed() >= Duration::from_millis(190), "{:?}", began.elapsed());
        // The group started beside it gets the same patience from its own start.
        let _beside = turns.begin();
        let began = Instant::now();
        finishes(turns.wait()).await;
        assert!(began.elapsed() >= Duration::from_millis(190), "{:?}", began.elapsed());
    }
}
