//! The loops that take durable work from the store: large-audience publishes
//! (jobs) and digest windows. They run on the async runtime but only wait
//! there — on the store, on the broker, on the pool; every CPU-heavy step
//! (parsing a 100k-user job, building notifications, encoding frames,
//! building a digest) runs on the worker pool's own threads.
//!
//! **Exactly once.** A job's notifications carry an idempotency key (the
//! publish's own, or `job:<job id>`), and a digest's carries
//! `digest:<window id>`. Whoever repeats a step — this node after a restart,
//! or another node after the lease expired — stores nothing twice and gets
//! the earlier notification back.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::time::{sleep, Instant};
use tracing::Instrument;

use crate::broker::Event;
use crate::hub::Delivery;
use crate::store::jobs::{DigestWindow, Job, JobOutcome};
use crate::store::{now_ms, rfc3339_ms, Appended, NewNotification, StoreError};
use crate::worker::pool::PoolError;
use crate::AppState;

/// The kind of a large-audience publish.
pub const FANOUT: &str = "fanout";
/// Users per append (one transaction, one broker batch).
const BATCH: usize = 1000;
/// How long an idle worker waits before looking for work again (sooner when
/// this node queues a job).
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How long the digest closer sleeps at most between looks.
const DIGEST_POLL: Duration = Duration::from_secs(1);
/// Digest windows closed per claim.
const DIGEST_CLAIM: u32 = 100;
/// Claims of a job before a failure keeps it as failed (see [`retries`]).
const MAX_ATTEMPTS: u32 = 5;
/// How long after it was accepted a job whose step failed for a transient
/// reason (the store unavailable, its disk full) is still retried, however
/// many claims that takes: the job is durable and the fault is an
/// operator's to mend, so an outage of up to this long costs a delay, not
/// the publish.
const TRANSIENT_RETRY_FOR: Duration = Duration::from_secs(3600);

/// A large-audience publish, as stored in the job's payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fanout {
    pub user_ids: Vec<String>,
    pub topic: String,
    pub payload: Box<RawValue>,
    pub idempotency_key: Option<String>,
    pub created_at_ms: i64,
}

enum Step {
    /// Every user is done.
    Completed,
    /// Shutting down, or the lease was lost: stop, someone resumes it.
    Interrupted,
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    /// Worth retrying (the store was unavailable).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (a malformed job).
    #[error("{0}")]
    Permanent(String),
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => JobError::Transient(m),
            StoreError::Internal(m) => JobError::Permanent(m),
        }
    }
}

impl From<PoolError> for JobError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Closed => JobError::Transient(e.to_string()),
            PoolError::Panicked(_) => JobError::Permanent(e.to_string()),
        }
    }
}

/// Runs `settings.workers` job loops and one digest closer until shutdown,
/// each finishing the batch in hand first.
pub async fn run(state: AppState) {
    let tasks = tokio_util::task::TaskTracker::new();
    for n in 0..state.settings.workers {
        tasks.spawn(job_loop(state.clone(), format!("{}/{n}", state.settings.node_id)));
    }
    tasks.spawn(digest_loop(state.clone(), format!("{}/digests", state.settings.node_id)));
    tasks.close();
    tasks.wait().await;
}

async fn job_loop(state: AppState, owner: String) {
    let lease = state.settings.job_lease;
    let mut failures = 0u32;
    while !state.shutdown.is_cancelled() {
        match state.store.claim(&owner, lease).await {
            Ok(Some(job)) => {
                failures = 0;
                run_job(&state, &owner, job).await;
            }
            Ok(None) => {
                tokio::select! {
                    _ = state.shutdown.cancelled() => {}
                    _ = state.work.notified() => {}
                    _ = sleep(IDLE_POLL) => {}
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot claim jobs; retrying");
                }
                tokio::select! {
                    _ = state.shutdown.cancelled() => {}
                    _ = sleep(backoff(failures)) => {}
                }
            }
        }
    }
}

/// Whether a job that failed for a transient reason on claim `attempts`,
/// `age_ms` after it was accepted, is retried: for its first
/// [`MAX_ATTEMPTS`] claims, and for [`TRANSIENT_RETRY_FOR`] after it was
/// accepted (with [`backoff`], a claim every 15–30 s by then).
fn retries(attempts: u32, age_ms: i64) -> bool {
    attempts < MAX_ATTEMPTS || age_ms < TRANSIENT_RETRY_FOR.as_millis() as i64
}

/// Exponential, capped at 30 s, with jitter.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(7));
    let capped = base.min(Duration::from_secs(30));
    capped.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

async fn run_job(state: &AppState, owner: &str, job: Job) {
    let metrics = &state.metrics;
    metrics.jobs_running.inc();
    let started = Instant::now();
    let span = tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt = job.attempts);
    // `instrument`, not `span.enter()`: a guard held across an await would
    // put whatever else that thread runs meanwhile (other requests) in the
    // job's span, and in its trace.
    let result = async {
        tracing::info!(done = job.done, total = job.total, "job claimed");
        match job.kind.as_str() {
            FANOUT => fanout(state, owner, &job).await,
            other => Err(JobError::Permanent(format!("unknown job kind `{other}`"))),
        }
    }
    .instrument(span.clone())
    .await;
    metrics.jobs_running.dec();
    let outcome = match result {
        Ok(Step::Completed) => {
            metrics.job_seconds.observe(started.elapsed().as_secs_f64());
            metrics.jobs_done.inc();
            JobOutcome::Done
        }
        Ok(Step::Interrupted) if state.shutdown.is_cancelled() => {
            // Hand it back at once rather than waiting for the lease.
            JobOutcome::Retry { at_ms: now_ms(), error: "interrupted by a node shutdown".into() }
        }
        Ok(Step::Interrupted) => {
            tracing::warn!(parent: &span, "lease lost; another worker has the job");
            return;
        }
        Err(JobError::Transient(e)) if retries(job.attempts, now_ms() - job.created_at_ms) => {
            tracing::warn!(parent: &span, error = %e, "job failed; retrying");
            JobOutcome::Retry { at_ms: now_ms() + backoff(job.attempts).as_millis() as i64, error: e }
        }
        Err(e) => {
            tracing::error!(parent: &span, error = %e, "job failed for good");
            metrics.jobs_failed.inc();
            JobOutcome::Failed { error: e.to_string() }
        }
    };
    if let Err(e) = state.store.finish(&job.id, owner, outcome).await {
        tracing::warn!(parent: &span, error = %e, "could not record the job's end; its lease will expire");
    } else {
        tracing::info!(parent: &span, "job ended");
    }
}

/// Stores and delivers a large-audience publish, [`BATCH`] users at a time,
/// from where the last holder of the job left off.
async fn fanout(state: &AppState, owner: &str, job: &Job) -> Result<Step, JobError> {
    let payload = job.payload.clone();
    let spec: Arc<Fanout> = state
        .pool
        .run(move || serde_json::from_str::<Fanout>(&payload).map(Arc::new))
        .await?
        .map_err(|e| JobError::Permanent(format!("malformed fanout job: {e}")))?;
    let key: Arc<str> = spec.idempotency_key.clone().unwrap_or_else(|| format!("job:{}", job.id)).into();
    let mut done = (job.done.max(0) as usize).min(spec.user_ids.len());
    while done < spec.user_ids.len() {
        if state.shutdown.is_cancelled() {
            return Ok(Step::Interrupted);
        }
        let end = (done + BATCH).min(spec.user_ids.len());
        let batch = {
            let (spec, key) = (spec.clone(), key.clone());
            state.pool.run(move || build_batch(&spec, &key, done..end)).await?
        };
        let appended = state.store.append(batch).await?;
        deliver(state, appended).await?;
        done = end;
        if !state.store.progress(&job.id, owner, done as i64, state.settings.job_lease).await? {
            return Ok(Step::Interrupted);
        }
    }
    Ok(Step::Completed)
}

fn build_batch(spec: &Fanout, key: &Arc<str>, range: std::ops::Range<usize>) -> Vec<NewNotification> {
    let topic: Arc<str> = spec.topic.as_str().into();
    let payload: Arc<RawValue> = Arc::from(spec.payload.clone());
    spec.user_ids[range]
        .iter()
        .map(|user| NewNotification {
            user_id: user.as_str().into(),
            id: uuid::Uuid::now_v7().to_string(),
            topic: topic.clone(),
            payload: payload.clone(),
            created_at_ms: spec.created_at_ms,
            idempotency_key: Some(key.clone()),
        })
        .collect()
}

/// Encodes the new notifications' frames on the pool and hands them to the broker.
async fn deliver(state: &AppState, appended: Vec<Appended>) -> Result<(), JobError> {
    let events = state
        .pool
        .run(move || {
            appended
                .into_iter()
                .filter(|a| a.created)
                .map(|a| Event {
                    user_id: a.notification.user_id.clone(),
                    delivery: Delivery::Notification { seq: a.notification.seq, frame: a.notification.frame().into() },
                    id: Some(a.notification.id),
                    trace: None,
                })
                .collect::<Vec<_>>()
        })
        .await?;
    state.metrics.notifications_published.inc_by(events.len() as u64);
    if !events.is_empty() {
        if let Err(e) = state.broker.publish(events).await {
            tracing::warn!(error = %e, "broker publish failed after commit; sessions repair from the store");
        }
    }
    Ok(())
}

/// Closes digest windows whose time has come, on whichever node claims them.
async fn digest_loop(state: AppState, owner: String) {
    let lease = state.settings.job_lease;
    let mut failures = 0u32;
    while !state.shutdown.is_cancelled() {
        let wait = match state.store.digest_claim_due(&owner, now_ms(), lease, DIGEST_CLAIM).await {
            Ok(windows) if !windows.is_empty() => {
                failures = 0;
                for window in windows {
                    if let Err(e) = close_digest(&state, window).await {
                        tracing::warn!(error = %e, "closing a digest failed; its lease will expire and it is retried");
                    }
                }
                continue;
            }
            Ok(_) => {
                failures = 0;
                match state.store.digest_next_close().await {
                    Ok(Some(at)) => {
                        Duration::from_millis((at - now_ms()).clamp(10, DIGEST_POLL.as_millis() as i64) as u64)
                    }
                    _ => DIGEST_POLL,
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot claim digest windows; retrying");
                }
                backoff(failures)
            }
        };
        tokio::select! {
            _ = state.shutdown.cancelled() => {}
            _ = state.work.notified() => {}
            _ = sleep(wait) => {}
        }
    }
}

async fn close_digest(state: &AppState, window: DigestWindow) -> Result<(), JobError> {
    let id = window.id.clone();
    let notification = state.pool.run(move || digest_notification(&window)).await?;
    let appended = state.store.append(vec![notification]).await?;
    deliver(state, appended).await?;
    state.store.digest_delete(&id).await?;
    state.metrics.digests_closed.inc();
    Ok(())
}

/// `{"digest":{"key","count","first_at","last_at","items":[…]}}`, the items byte-exact.
pub fn digest_notification(window: &DigestWindow) -> NewNotification {
    let string = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let mut payload = format!(
        r#"{{"digest":{{"key":{},"count":{},"first_at":{},"last_at":{},"items":["#,
        string(&window.key),
        window.count,
        string(&rfc3339_ms(window.first_at_ms)),
        string(&rfc3339_ms(window.last_at_ms)),
    );
    for (i, item) in window.items.iter().enumerate() {
        if i > 0 {
            payload.push(',');
        }
        payload.push_str(item.get());
    }
    payload.push_str("]}}");
    let payload = RawValue::from_string(payload).expect("a digest built from JSON values is JSON");
    NewNotification {
        user_id: window.user_id.clone(),
        id: uuid::Uuid::now_v7().to_string(),
        topic: window.topic.clone(),
        payload: Arc::from(payload),
        created_at_ms: window.closes_at_ms.max(window.last_at_ms),
        idempotency_key: Some(format!("digest:{}", window.id).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_payload_keeps_items_byte_exact() {
        let item = |s: &str| Arc::from(RawValue::from_string(s.into()).unwrap());
        let window = DigestWindow {
            id: "w1".into(),
            user_id: "alice".into(),
            key: "post:9:\"likes\"".into(),
            topic: "likes".into(),
            first_at_ms: 0,
            last_at_ms: 1000,
            count: 12,
            items: vec![item(r#"{"by": "bob" }"#), item("[1.50]")],
            closes_at_ms: 60_000,
        };
        let n = digest_notification(&window);
        assert_eq!(
            n.payload.get(),
            r#"{"digest":{"key":"post:9:\"likes\"","count":12,"first_at":"1970-01-01T00:00:00.000Z","last_at":"1970-01-01T00:00:01.000Z","items":[{"by": "bob" },[1.50]]}}"#
        );
        assert_eq!(n.idempotency_key.as_deref(), Some("digest:w1"));
    }

    #[test]
    fn transient_failures_are_retried_for_an_hour_and_at_least_five_claims() {
        let minutes = |m: i64| m * 60_000;
        assert!(retries(1, 0));
        assert!(retries(5, minutes(1)), "a sixth claim within the hour");
        assert!(retries(200, minutes(59)));
        assert!(retries(4, minutes(600)), "five claims, however long ago it was accepted");
        assert!(!retries(5, minutes(61)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(500));
        assert!(backoff(20) <= Duration::from_secs(30));
        assert!(backoff(20) >= Duration::from_secs(15));
    }
}
