//! `ping-under-fanout`: WebSocket ping round trips while a large-audience
//! job runs. Heavy work runs on the server's worker pool; if it ever ran on
//! the runtime that drives the sockets, these round trips would show it.
//!
//! Phase 1 measures `--sessions` sessions pinging every `--interval-ms` for
//! `--seconds`; phase 2 publishes to `--audience` users (the sessions' users
//! among them, so they also receive the fan-out) and measures the same
//! round trips until the job is done.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald_client::{ClientFrame, Connect, PublishRequest, Publisher, ServerFrame, Session, Submitted};
use serde_json::Value;

pub struct Args {
    pub url: String,
    pub api_key: String,
    pub jwt_secret: String,
    pub sessions: usize,
    pub interval: Duration,
    pub seconds: u64,
    pub audience: usize,
}

/// Round-trip times, sorted.
struct Rtts(Vec<Duration>);

impl Rtts {
    fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i]
    }

    fn line(&self, label: &str) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "| {label} | {} | {:.2} | {:.2} | {:.2} |",
            self.0.len(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.0.last().copied().unwrap_or_default())
        )
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let ws = args.url.replacen("http", "ws", 1);
    let mut sessions = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let token = herald_server::auth::mint(&args.jwt_secret, &user(i), 3600);
        let session = Connect::new(&ws, token).connect().await.with_context(|| format!("connecting session {i}"))?;
        sessions.push(session);
    }
    eprintln!("{} sessions open; measuring {} s without load", sessions.len(), args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let pinging = start(sessions, args.interval, stop.clone());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::SeqCst);
    let (sessions, idle) = collect(pinging).await?;

    let publisher = Publisher::new(&args.url, &args.api_key);
    let request = PublishRequest {
        user_id: None,
        user_ids: Some((0..args.audience).map(user).collect()),
        topic: "loadtest.fanout".into(),
        payload: serde_json::json!({"bench": "ping-under-fanout"}),
        idempotency_key: None,
        digest: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pinging = start(sessions, args.interval, stop.clone());
    let started = Instant::now();
    let job_id = match publisher.submit(&request).await? {
        (_, Submitted::Job(job)) => job.job_id,
        (status, other) => bail!("expected a 202 job, got {status} {other:?}"),
    };
    eprintln!("job {job_id} for {} users queued; measuring until it is done", args.audience);
    loop {
        let status = publisher.job(&job_id).await?;
        match status.state.as_str() {
            "done" => break,
            "failed" => bail!("the job failed: {:?}", status.error),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let job_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (_, busy) = collect(pinging).await?;

    println!("| phase | round trips | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!("{}", idle.line("idle"));
    println!("{}", busy.line(&format!("during a {}-user fan-out job", args.audience)));
    println!();
    println!(
        "job: {} users stored and delivered in {:.2} s ({:.0} notifications/s)",
        args.audience,
        job_time.as_secs_f64(),
        args.audience as f64 / job_time.as_secs_f64()
    );
    Ok(())
}

fn user(i: usize) -> String {
    format!("lt-{i}")
}

type Pinging = Vec<tokio::task::JoinHandle<anyhow::Result<(Session, Vec<Duration>)>>>;

fn start(sessions: Vec<Session>, interval: Duration, stop: Arc<AtomicBool>) -> Pinging {
    sessions
        .into_iter()
        .enumerate()
        .map(|(i, session)| {
            let stop = stop.clone();
            // Spread the sessions' pings over the interval.
            let offset = interval.mul_f64(i as f64 / 997.0 % 1.0);
            tokio::spawn(ping_loop(session, interval, offset, stop))
        })
        .collect()
}

async fn ping_loop(
    mut session: Session,
    interval: Duration,
    offset: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Session, Vec<Duration>)> {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    let mut rtts = Vec::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        let sent = Instant::now();
        session.send(&ClientFrame::Ping { reference: Some(Value::from(n)) }).await?;
        loop {
            match session.next_frame().await? {
                ServerFrame::Pong { reference } if reference == Some(Value::from(n)) => break,
                _ => {}
            }
        }
        rtts.push(sent.elapsed());
    }
    Ok((session, rtts))
}

async fn collect(pinging: Pinging) -> anyhow::Result<(Vec<Session>, Rtts)> {
    let mut sessions = Vec::new();
    let mut all = Vec::new();
    for task in pinging {
        let (session, rtts) = task.await??;
        sessions.push(session);
        all.extend(rtts);
    }
    all.sort_unstable();
    Ok((sessions, Rtts(all)))
}
