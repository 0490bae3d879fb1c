//! `slow`: a fraction of the clients stop reading their sockets (they stay
//! open) while the others are measured under an open-loop stream.
//!
//! The stalled clients get a flood of notifications until the server gives
//! up on them — its outbox for the session overflows, or a write stalls for
//! three heartbeats — and closes them with 1013. The coordinator sees that
//! through `GET /v1/users/{id}/presence` dropping to 0 and lets that client
//! read again at once: it drains what the kernel buffered, reads the close
//! frame (1013, or 1006 when the server had to drop the socket without one),
//! reconnects with `since` and must recover everything.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use super::{exit_code, Bench, ClientSetup, Connected, Started};
use crate::args::{Clients, Common};
use crate::chart::{Chart, XScale};
use crate::cli::Publishing;
use crate::fleet::protocol::user_id;
use crate::fleet::worker::unix_ns;
use crate::fleet::{Command, Report};
use crate::hist::{histogram, merge, percentile_curve, thousands, Percentiles};
use crate::procstat::{server_tables, ServerUsage};
use crate::progress::Sample;
use crate::publish::{open_loop, Job, OpenLoop, Plan, PublishStats, Publishers};
use crate::report::{targets_table, Target};
use crate::verify::{verify, Verification};

pub struct Args {
    pub common: Common,
    pub clients: Clients,
    pub publishing: Publishing,
    pub slow_fraction: f64,
    pub rate: f64,
    pub duration: Duration,
    pub flood_rate: f64,
    pub flood_bytes: usize,
    pub slow_timeout: Duration,
}

#[derive(Serialize)]
struct Result {
    scenario: &'static str,
    started_at: String,
    commit: Option<String>,
    label: Option<String>,
    clients: ClientSetup,
    connected: Connected,
    stalled: u64,
    readers: u64,
    /// Stalled clients the server closed (presence went to 0) before `--slow-timeout`.
    closed_by_server: u64,
    /// Stall → the server closed the session.
    time_to_close: Percentiles,
    /// Close codes the stalled clients read once they read again.
    stalled_close_codes: BTreeMap<u16, u64>,
    /// Readers whose session the server ended (should be 0).
    readers_dropped: u64,
    flood_notifications: u64,
    stream: OpenLoop,
    published: PublishStats,
    /// Readers: publish → deliver.
    latency: Percentiles,
    /// Stalled clients: their reconnect → caught up.
    recovery: Percentiles,
    server: ServerUsage,
    verification: Verification,
    targets: Vec<Target>,
    timeline: Vec<Sample>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let Started { bench, setup, pubs, expected, connected } =
        Bench::start_publishing("slow", &args.common, &args.clients).await?;
    let by_node = bench.targets_by_node(&bench.fleet.reports().await?);
    let stride = (1.0 / args.slow_fraction.clamp(1e-6, 1.0)).round().max(1.0) as u32;
    let stalled: Vec<u32> = by_node.iter().flatten().copied().filter(|j| j % stride == 0).collect();
    let readers: Vec<Vec<u32>> =
        by_node.iter().map(|v| v.iter().copied().filter(|j| j % stride != 0).collect()).collect();

    bench.progress.phase("stall");
    bench.fleet.to_clients(&stalled, |clients| Command::Pause { clients }).await?;
    let from = bench.phase_start().await;
    let plan = Plan {
        rate: args.rate,
        batch: 1,
        duration: args.duration,
        concurrency: args.publishing.publishers,
        pad: args.publishing.payload_bytes,
        cross_node: false,
        max_lag: Duration::from_secs(30),
    };
    let stream = {
        let (pubs, plan, readers) = (pubs.clone(), plan.clone(), readers.clone());
        tokio::spawn(async move { open_loop(&pubs, &plan, &readers).await })
    };
    let flood = flood_until_closed(&bench, &pubs, &args, &stalled).await?;
    bench.progress.phase("stream");
    let stream = stream.await?;
    let published = pubs.stats();
    let drained = bench.drain(expected.total(), Duration::from_secs(60)).await?;
    let timeline = bench.progress.timeline();
    let server = bench.usage(&from, &timeline).await;
    let reports = bench.fleet.reports().await?;
    let verification = verify(&reports, &expected, published.errors);
    verification.shout();
    let (stalled_close_codes, readers_dropped) = closes(&reports, stride);
    let stalled_n = stalled.len() as u64;
    let got_1013 = stalled_close_codes.get(&1013).copied().unwrap_or(0);
    let targets = vec![
        Target::new(
            "stalled clients closed by the server with 1013",
            "all",
            format!("{got_1013} of {stalled_n} (codes read: {stalled_close_codes:?})"),
            got_1013 == stalled_n,
        ),
        Target::new(
            "stalled clients recover everything with since",
            "0 lost, 0 duplicates",
            format!(
                "{} caught up; {} lost, {} duplicates overall",
                drained.caught_up, verification.lost, verification.duplicates
            ),
            verification.ok && drained.caught_up >= stalled_n,
        ),
        Target::new(
            "readers undisturbed",
            "no reader closed",
            format!("{readers_dropped} closed"),
            readers_dropped == 0,
        ),
    ];
    let result = Result {
        scenario: "slow",
        started_at: bench.run.started_at.clone(),
        commit: bench.run.commit.clone(),
        label: args.common.label.clone(),
        clients: setup,
        connected,
        stalled: stalled_n,
        readers: readers.iter().map(|v| v.len() as u64).sum(),
        closed_by_server: flood.closed,
        time_to_close: Percentiles::of(&flood.time_to_close),
        stalled_close_codes,
        readers_dropped,
        flood_notifications: flood.notifications,
        stream,
        published,
        latency: Percentiles::of(&merge(reports.iter().map(|r| &r.latency))),
        recovery: Percentiles::of(&merge(reports.iter().map(|r| &r.catch_up))),
        server,
        verification,
        targets,
        timeline,
    };
    let chart = Chart::new("Readers' publish → deliver by percentile", "percentile", "ms", XScale::Percentile)
        .series("readers", percentile_curve(&merge(reports.iter().map(|r| &r.latency))));
    bench.run.write_file("latency.svg", &chart.render())?;
    bench.run.write_file("summary.md", &summary(&bench, &result, &args))?;
    bench.run.write_json(&result)?;
    let ok = result.verification.ok;
    let run = bench.finish().await?;
    crate::report::announce(&run.dir);
    Ok(exit_code(ok))
}

struct Flood {
    closed: u64,
    notifications: u64,
    time_to_close: hdrhistogram::Histogram<u64>,
}

/// Floods the stalled clients until the server has closed each (then lets
/// it read again), or until `--slow-timeout`. The presence checks run beside
/// the flood, every [`CHECK_EVERY`], not between its rounds: a closed client
/// must read again within the server's close timeout (5 s) to find its 1013,
/// and a flood round can take that long on a busy node.
async fn flood_until_closed(
    bench: &Bench,
    pubs: &Arc<Publishers>,
    args: &Args,
    stalled: &[u32],
) -> anyhow::Result<Flood> {
    let http = reqwest::Client::new();
    let urls = args.common.http_urls();
    let started = Instant::now();
    let pending = std::sync::Mutex::new(stalled.to_vec());
    let running = || !pending.lock().unwrap().is_empty() && started.elapsed() < args.slow_timeout;
    let tick = Duration::from_millis(100);
    let flood = async {
        let mut notifications = 0u64;
        while running() {
            // This tick's share of --flood-rate: every pending client `rounds`
            // times, or (more pending than the budget) a rotating window of them.
            let (window, rounds): (Vec<u32>, usize) = {
                let mut pending = pending.lock().unwrap();
                if pending.is_empty() {
                    break;
                }
                let budget = (args.flood_rate * tick.as_secs_f64()).max(1.0) as usize;
                let rounds = (budget / pending.len()).max(1);
                let shift = budget.min(pending.len()) % pending.len();
                pending.rotate_left(shift);
                (pending[..budget.min(pending.len())].to_vec(), rounds)
            };
            let mut jobs = Vec::new();
            for _ in 0..rounds {
                for node in 0..bench.nodes {
                    let mine: Vec<u32> = window.iter().copied().filter(|j| *j as usize % bench.nodes == node).collect();
                    for users in mine.chunks(1000) {
                        jobs.push(Job { node, users: users.to_vec(), sent_ns: unix_ns(), pad: args.flood_bytes });
                    }
                }
            }
            notifications += jobs.iter().map(|j| j.users.len() as u64).sum::<u64>();
            let round = Instant::now();
            pubs.run_all(jobs, args.publishing.publishers.min(8)).await;
            tokio::time::sleep_until(round + tick).await;
        }
        notifications
    };
    let watch = async {
        let mut time_to_close = histogram();
        while running() {
            tokio::time::sleep(CHECK_EVERY).await;
            let users = pending.lock().unwrap().clone();
            let gone = closed_sessions(&http, &urls, &args.common.api_key, &bench.prefix, &users).await;
            if gone.is_empty() {
                continue;
            }
            for _ in &gone {
                time_to_close.saturating_record(started.elapsed().as_micros() as u64);
            }
            pending.lock().unwrap().retain(|j| !gone.contains(j));
            bench.fleet.to_clients(&gone, |clients| Command::Resume { clients }).await?;
        }
        anyhow::Ok(time_to_close)
    };
    let (notifications, time_to_close) = tokio::join!(flood, watch);
    let time_to_close = time_to_close?;
    let pending = pending.into_inner().unwrap();
    if !pending.is_empty() {
        eprintln!(
            "{} stalled clients were not closed within {:?}; letting them read",
            pending.len(),
            args.slow_timeout
        );
        bench.fleet.to_clients(&pending, |clients| Command::Resume { clients }).await?;
    }
    let closed = (stalled.len() - pending.len()) as u64;
    eprintln!("the server closed {closed} of {} stalled clients", stalled.len());
    Ok(Flood { closed, notifications, time_to_close })
}

/// How often the stalled clients' presence is checked while the flood runs.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The clients among `users` with no session on the server (presence 0).
async fn closed_sessions(http: &reqwest::Client, urls: &[String], key: &str, prefix: &str, users: &[u32]) -> Vec<u32> {
    let checks = futures_util::stream::iter(users.iter().copied().map(|j| {
        let url = format!("{}/v1/users/{}/presence", urls[j as usize % urls.len()], user_id(prefix, j as usize));
        let request = http.get(url).bearer_auth(key);
        async move {
            let answer = request.send().await.ok()?.json::<serde_json::Value>().await.ok()?;
            (answer.get("sessions")?.as_u64()? == 0).then_some(j)
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    checks.into_iter().flatten().collect()
}

/// The stalled clients' last close codes, and how many readers were closed.
fn closes(reports: &[Report], stride: u32) -> (BTreeMap<u16, u64>, u64) {
    let mut codes = BTreeMap::new();
    let mut readers_dropped = 0;
    for r in reports {
        for (((&j, &start), &code), &n) in r.clients.iter().zip(&r.start).zip(&r.last_close).zip(&r.closed) {
            if start < 0 {
                continue;
            }
            if j % stride == 0 {
                *codes.entry(code).or_default() += 1;
            } else if n > 0 {
                readers_dropped += 1;
            }
        }
    }
    (codes, readers_dropped)
}

fn summary(bench: &Bench, r: &Result, args: &Args) -> String {
    let mut md = bench.run.header(r.label.as_deref());
    md += &format!(
        "{} clients ({} open) in {} processes over {} node(s); {} stalled (every {}th stops reading), {} readers under {} notifications/s for {}; the stalled ones flooded at up to {} notifications/s of {} bytes until closed.\n\n",
        thousands(r.clients.connections as u64),
        thousands(r.connected.open),
        r.clients.processes,
        r.clients.nodes.len(),
        r.stalled,
        (1.0 / args.slow_fraction).round(),
        r.readers,
        args.rate,
        humantime::format_duration(args.duration),
        args.flood_rate,
        args.flood_bytes
    );
    md += "| measure | value |\n|---|---|\n";
    md += &format!("| stalled clients closed by the server | {} of {} |\n", r.closed_by_server, r.stalled);
    md +=
        &format!("| stall → closed, p50 / max | {:.0} / {:.0} ms |\n", r.time_to_close.p50_ms, r.time_to_close.max_ms);
    md += &format!("| close codes the stalled clients read | {:?} (0: none) |\n", r.stalled_close_codes);
    md += &format!("| flood | {} notifications |\n", thousands(r.flood_notifications));
    md += &format!("| readers closed | {} |\n", r.readers_dropped);
    md += &format!(
        "| published (acknowledged) | {} ({} errors) |\n",
        thousands(r.published.notifications),
        r.published.errors
    );
    md += &format!(
        "| server CPU | {:.0}% of one core; RSS peak {} MiB |\n\n",
        r.server.cpu_percent,
        r.server.rss_peak_kib / 1024
    );
    md += Percentiles::HEADER;
    md += &format!(
        "\n{}\n{}\n\n",
        r.latency.row("readers: publish → deliver"),
        r.recovery.row("stalled: reconnect → caught up")
    );
    md += &server_tables("from the stall to the last delivery", &r.server);
    md += &r.verification.paragraph();
    md += &targets_table(&r.targets);
    md += "![readers' latency by percentile](latency.svg)\n";
    md
}
