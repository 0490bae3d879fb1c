//! Publishing load: `POST /v1/notifications` over keep-alive HTTP through
//! `herald_client::Publisher`, from a pool of concurrent publishers.
//!
//! [`open_loop`] schedules publishes at a fixed rate whatever the server's
//! answers do (so a slow server shows as latency, not as a lower rate), each
//! payload carrying its *scheduled* send time; [`Publishers::run_all`]
//! publishes a fixed list as fast as the pool goes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use herald_client::{PublishRequest, Publisher, Submitted};
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::Serialize;
use tokio::time::Instant;

use crate::fleet::frame;
use crate::fleet::protocol::user_id;
use crate::fleet::worker::unix_ns;
use crate::verify::Expected;

pub const TOPIC: &str = "loadtest";

/// One publish: to these clients' users, through node `node`.
#[derive(Debug, Clone)]
pub struct Job {
    pub node: usize,
    pub users: Vec<u32>,
    /// When it was meant to go out (unix ns); carried in the payload.
    pub sent_ns: u64,
    pub pad: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PublishStats {
    pub requests: u64,
    pub notifications: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
}

/// The publishers' shared state: one HTTP client per node, and what was acknowledged.
pub struct Publishers {
    nodes: Vec<Publisher>,
    prefix: String,
    pub expected: Arc<Expected>,
    requests: AtomicU64,
    notifications: AtomicU64,
    errors: AtomicU64,
    error_kinds: Mutex<BTreeMap<String, u64>>,
    /// Request → answer, µs.
    pub round_trip: Mutex<Histogram<u64>>,
}

impl Publishers {
    pub fn new(urls: &[String], api_key: &str, prefix: &str, expected: Arc<Expected>) -> Arc<Publishers> {
        Arc::new(Publishers {
            nodes: urls.iter().map(|u| Publisher::new(u.clone(), api_key)).collect(),
            prefix: prefix.into(),
            expected,
            requests: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            error_kinds: Mutex::default(),
            round_trip: Mutex::new(crate::hist::histogram()),
        })
    }

    pub fn node(&self, i: usize) -> &Publisher {
        &self.nodes[i % self.nodes.len()]
    }

    pub fn stats(&self) -> PublishStats {
        PublishStats {
            requests: self.requests.load(Ordering::Relaxed),
            notifications: self.notifications.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            error_kinds: self.error_kinds.lock().unwrap().clone(),
        }
    }

    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }

    pub fn error(&self, kind: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let kind: String = kind.chars().take(120).collect();
        *self.error_kinds.lock().unwrap().entry(kind).or_default() += 1;
    }

    /// Publishes one job and records what the server acknowledged.
    pub async fn send(&self, job: &Job) {
        let mut names: Vec<String> = job.users.iter().map(|&j| user_id(&self.prefix, j as usize)).collect();
        let (user_id, user_ids) = match names.len() {
            1 => (names.pop(), None),
            _ => (None, Some(names)),
        };
        let request = PublishRequest {
            user_id,
            user_ids,
            topic: TOPIC.into(),
            payload: frame::payload(job.sent_ns, job.pad),
            idempotency_key: None,
            digest: None,
        };
        let started = Instant::now();
        match self.node(job.node).publish(&request).await {
            Ok((_, answer)) if answer.notifications.len() == job.users.len() => {
                let micros = started.elapsed().as_micros() as u64;
                self.round_trip.lock().unwrap().saturating_record(micros.max(1));
                for &j in &job.users {
                    self.expected.add(j);
                }
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.notifications.fetch_add(job.users.len() as u64, Ordering::Relaxed);
            }
            Ok((status, answer)) => self.error(format!("{status}: {} answers", answer.notifications.len())),
            Err(e) => self.error(e.to_string()),
        }
    }

    /// A large-audience publish (answered 202 with a job): `tracked` are the
    /// connected clients among `audience` (user names). Returns the job id,
    /// or `None` when the audience was small enough to be stored at once (201).
    pub async fn submit_job(
        &self,
        node: usize,
        audience: Vec<String>,
        tracked: &[u32],
    ) -> anyhow::Result<Option<String>> {
        let request = PublishRequest {
            user_id: None,
            user_ids: Some(audience),
            topic: TOPIC.into(),
            payload: frame::payload(unix_ns(), 0),
            idempotency_key: None,
            digest: None,
        };
        let job = match self.node(node).submit(&request).await? {
            (_, Submitted::Job(job)) => Some(job.job_id),
            (_, Submitted::Stored(_)) => None,
            (status, other) => anyhow::bail!("expected a job or stored notifications, got {status} {other:?}"),
        };
        for &j in tracked {
            self.expected.add(j);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.notifications.fetch_add(request.user_ids.map_or(0, |u| u.len() as u64), Ordering::Relaxed);
        Ok(job)
    }

    /// Publishes every job, `concurrency` at a time, as fast as they go.
    pub async fn run_all(self: &Arc<Self>, jobs: Vec<Job>, concurrency: usize) {
        let (tx, rx) = async_channel::bounded(jobs.len().max(1));
        for job in jobs {
            tx.try_send(job).expect("the channel holds every job");
        }
        drop(tx);
        let pool: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                let (me, rx) = (self.clone(), rx.clone());
                tokio::spawn(async move {
                    while let Ok(job) = rx.recv().await {
                        me.send(&job).await;
                    }
                })
            })
            .collect();
        for task in pool {
            let _ = task.await;
        }
    }
}

/// An open-loop publishing plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Notifications per second (a publish to `batch` users counts `batch`).
    pub rate: f64,
    pub batch: usize,
    pub duration: Duration,
    pub concurrency: usize,
    pub pad: usize,
    /// Publish through the next node rather than the user's own (exercises the broker).
    pub cross_node: bool,
    /// Stop early when publishes leave this late (the server cannot keep the rate).
    pub max_lag: Duration,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct OpenLoop {
    pub scheduled_notifications: u64,
    pub scheduled_requests: u64,
    /// Longest wait of a scheduled publish for a free publisher, ms.
    pub max_queue_ms: f64,
    pub seconds: f64,
    /// Stopped before `duration`: publishes fell more than `max_lag` behind.
    pub stopped_lagging: bool,
}

/// Publishes at `plan.rate` to random users of `targets` (the clients per
/// node) for `plan.duration`; returns once every scheduled publish is answered.
pub async fn open_loop(pubs: &Arc<Publishers>, plan: &Plan, targets: &[Vec<u32>]) -> OpenLoop {
    let nodes: Vec<usize> = (0..targets.len()).filter(|&n| !targets[n].is_empty()).collect();
    if nodes.is_empty() || plan.rate <= 0.0 {
        return OpenLoop::default();
    }
    let (tx, rx) = async_channel::bounded::<Job>(1_000_000);
    let max_queue = Arc::new(AtomicU64::new(0));
    let max_lag_ns = plan.max_lag.as_nanos() as u64;
    let pool: Vec<_> = (0..plan.concurrency.max(1))
        .map(|_| {
            let (pubs, rx, max_queue) = (pubs.clone(), rx.clone(), max_queue.clone());
            tokio::spawn(async move {
                while let Ok(job) = rx.recv().await {
                    let late = unix_ns().saturating_sub(job.sent_ns);
                    if max_queue.fetch_max(late, Ordering::Relaxed).max(late) > max_lag_ns {
                        continue; // Hopelessly behind: drop what is queued (never acknowledged, so not expected).
                    }
                    pubs.send(&job).await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let schedule = {
        let (plan, targets, max_queue) = (plan.clone(), targets.to_vec(), max_queue.clone());
        tokio::task::spawn_blocking(move || pace(&plan, &targets, &nodes, tx, &max_queue, max_lag_ns))
    };
    let mut out = schedule.await.expect("the pacer does not panic");
    for task in pool {
        let _ = task.await;
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.max_queue_ms = max_queue.load(Ordering::Relaxed) as f64 / 1e6;
    out
}

/// Least time between the pacer's wake-ups: at most this much of a publish's measured
/// latency is the load generator's own wait (the payload carries the
/// scheduled time). Publishes 200 µs apart or more (≤ 5,000/s) leave on
/// time, one by one.
const PACE_SLICE: Duration = Duration::from_micros(200);

/// The schedule of [`open_loop`], on a thread of its own. Paced by tokio's
/// timer, which ticks in milliseconds, a publish left up to a millisecond
/// after its scheduled time, and since latency counts from the scheduled
/// time, that wait showed as ≈0.6–1.3 ms of publish → deliver latency that
/// was the load generator's. A thread sleeping on the OS's timer leaves
/// within tens of microseconds. Its wake-ups are at least [`PACE_SLICE`]
/// apart, each releasing everything due: waking for every publish at high
/// rates cost the load generator a context switch each. Returns when the plan is done or it
/// fell `max_lag_ns` behind; dropping `tx` then ends the publishers.
fn pace(
    plan: &Plan,
    targets: &[Vec<u32>],
    nodes: &[usize],
    tx: async_channel::Sender<Job>,
    max_queue: &AtomicU64,
    max_lag_ns: u64,
) -> OpenLoop {
    let per_request = Duration::from_secs_f64(plan.batch as f64 / plan.rate);
    let (start, start_ns) = (std::time::Instant::now(), unix_ns());
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut k: u64 = 0;
    let mut out = OpenLoop::default();
    // The earliest the next wake-up may be: a slice after the last one's
    // *planned* time, so that at ≤ 5,000/s every publish leaves on time.
    let mut not_before = start;
    loop {
        let due = per_request.mul_f64(k as f64);
        if due >= plan.duration {
            break;
        }
        if max_queue.load(Ordering::Relaxed) > max_lag_ns {
            out.stopped_lagging = true;
            eprintln!(
                "publishes are over {:?} behind schedule: the server cannot keep this rate; stopping",
                plan.max_lag
            );
            break;
        }
        let wake = (start + due).max(not_before);
        if let Some(wait) = wake.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        not_before = wake + PACE_SLICE;
        // Everything due by now goes out.
        let now = start.elapsed();
        while per_request.mul_f64(k as f64) <= now && per_request.mul_f64(k as f64) < plan.duration {
            let node = nodes[k as usize % nodes.len()];
            let pool = &targets[node];
            let users: Vec<u32> = match plan.batch >= pool.len() {
                true => pool.clone(),
                false => sample(&mut rng, pool.len(), plan.batch).into_iter().map(|i| pool[i]).collect(),
            };
            let via = if plan.cross_node { node + 1 } else { node };
            let sent_ns = start_ns + per_request.mul_f64(k as f64).as_nanos() as u64;
            out.scheduled_notifications += users.len() as u64;
            out.scheduled_requests += 1;
            let job = Job { node: via, users, sent_ns, pad: plan.pad };
            if tx.send_blocking(job).is_err() {
                break;
            }
            k += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At 20,000/s the pacer wakes at most every 200 µs, yet every scheduled
    /// publish goes out once, in order, stamped with its own scheduled time.
    #[test]
    fn the_pacer_releases_every_publish_with_its_scheduled_time() {
        let plan = Plan {
            rate: 20_000.0,
            batch: 1,
            duration: Duration::from_millis(100),
            concurrency: 1,
            pad: 0,
            cross_node: false,
            max_lag: Duration::from_secs(5),
        };
        let (tx, rx) = async_channel::unbounded();
        let out = pace(&plan, &[vec![7, 8, 9]], &[0], tx, &AtomicU64::new(0), u64::MAX);
        let jobs: Vec<Job> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(jobs.len(), 2_000);
        assert_eq!(out.scheduled_requests, 2_000);
        assert_eq!(out.scheduled_notifications, 2_000);
        assert!(!out.stopped_lagging);
        for pair in jobs.windows(2) {
            assert_eq!(pair[1].sent_ns - pair[0].sent_ns, 50_000, "each publish keeps its own slot");
        }
        assert!(jobs.iter().all(|j| j.users.len() == 1 && [7, 8, 9].contains(&j.users[0])));
    }
}
