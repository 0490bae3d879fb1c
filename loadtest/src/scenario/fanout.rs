//! `fanout`: one notification to many users at once.
//!
//! - Jobs: a publish naming more users than the node's `HERALD_MAX_USER_IDS`
//!   (default 1000) is answered 202 and stored and delivered by the worker
//!   pool. Each job names every connected user of a node plus offline users up
//!   to `--audience`.
//! - Bursts: every connected user once, in publishes of `--batch` users
//!   (201 path), all sent at the same moment by the publisher pool.
//!
//! For each round: deliveries/s and the time from the publish to the last
//! delivery; at the end every user's seqs are checked.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{exit_code, Bench, ClientSetup, Connected, Started};
use crate::args::{Clients, Common};
use crate::chart::{Chart, XScale};
use crate::cli::Publishing;
use crate::fleet::protocol::user_id;
use crate::fleet::worker::unix_ns;
use crate::hist::{merge, percentile_curve, thousands, Percentiles};
use crate::procstat::{server_tables, ServerUsage};
use crate::progress::Sample;
use crate::publish::{Job, PublishStats, Publishers};
use crate::report::{targets_table, Target};
use crate::verify::{verify, Verification};

pub struct Args {
    pub common: Common,
    pub clients: Clients,
    pub publishing: Publishing,
    pub audience: Option<usize>,
    pub jobs: usize,
    pub bursts: usize,
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Round {
    kind: &'static str,
    /// Users named (connected and offline).
    audience: u64,
    /// Deliveries expected (connected users).
    deliveries: u64,
    /// Publish → the server acknowledged (burst) or reported the job done.
    stored_seconds: f64,
    /// Publish → the last delivery.
    last_delivery_seconds: f64,
    deliveries_per_sec: f64,
    stored_per_sec: f64,
}

#[derive(Serialize)]
struct Result {
    scenario: &'static str,
    started_at: String,
    commit: Option<String>,
    label: Option<String>,
    clients: ClientSetup,
    connected: Connected,
    rounds: Vec<Round>,
    job_latency: Percentiles,
    burst_latency: Percentiles,
    published: PublishStats,
    server: ServerUsage,
    verification: Verification,
    targets: Vec<Target>,
    timeline: Vec<Sample>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let Started { bench, setup, pubs, expected, connected } =
        Bench::start_publishing("fanout", &args.common, &args.clients).await?;
    let by_node = bench.targets_by_node(&bench.fleet.reports().await?);
    let from = bench.phase_start().await;
    let mut rounds = Vec::new();

    let audience = args.audience.unwrap_or(0).max(connected.open as usize);
    for round in 0..args.jobs {
        bench.progress.phase(&format!("job {}", round + 1));
        rounds.push(job_round(&bench, &pubs, &by_node, audience, round).await?);
    }
    let after_jobs = merge(bench.fleet.reports().await?.iter().map(|r| &r.latency));
    for round in 0..args.bursts {
        bench.progress.phase(&format!("burst {}", round + 1));
        rounds.push(burst_round(&bench, &pubs, &by_node, &args).await?);
    }
    let timeline = bench.progress.timeline();
    let server = bench.usage(&from, &timeline).await;
    let reports = bench.fleet.reports().await?;
    let published = pubs.stats();
    let verification = verify(&reports, &expected, published.errors);
    verification.shout();
    let mut bursts_hist = merge(reports.iter().map(|r| &r.latency));
    bursts_hist.subtract(&after_jobs).ok();

    let burst_rate = rounds.iter().filter(|r| r.kind == "burst").map(|r| r.stored_per_sec).fold(0.0, f64::max);
    let burst_size = rounds.iter().filter(|r| r.kind == "burst").map(|r| r.audience).max().unwrap_or(0);
    let targets = vec![Target::new(
        "notifications/s batched (bursts of --batch users per publish)",
        "≥ 50,000/s",
        format!("{burst_rate:.0}/s"),
        burst_rate >= 49_500.0,
    )
    .when(burst_size >= 10_000, &format!("bursts of {} users are too small to tell", thousands(burst_size)))];
    let result = Result {
        scenario: "fanout",
        started_at: bench.run.started_at.clone(),
        commit: bench.run.commit.clone(),
        label: args.common.label.clone(),
        clients: setup,
        connected,
        rounds,
        job_latency: Percentiles::of(&after_jobs),
        burst_latency: Percentiles::of(&bursts_hist),
        published,
        server,
        verification,
        targets,
        timeline,
    };
    write(&bench, &result, &after_jobs, &bursts_hist)?;
    let ok = result.verification.ok;
    let run = bench.finish().await?;
    crate::report::announce(&run.dir);
    Ok(exit_code(ok))
}

/// One job per node: its connected users plus its share of offline ones.
async fn job_round(
    bench: &Bench,
    pubs: &Arc<Publishers>,
    by_node: &[Vec<u32>],
    audience: usize,
    round: usize,
) -> anyhow::Result<Round> {
    let before = bench.fleet.sync().await?;
    let goal = pubs.expected.total() + by_node.iter().map(|v| v.len() as u64).sum::<u64>();
    let started_ns = unix_ns();
    let started = tokio::time::Instant::now();
    let mut jobs = Vec::new();
    let mut named = 0u64;
    for (node, users) in by_node.iter().enumerate() {
        let share = audience.div_ceil(by_node.len()).max(users.len());
        let mut names: Vec<String> = users.iter().map(|&j| user_id(&bench.prefix, j as usize)).collect();
        let offline = share - users.len();
        names.extend((0..offline).map(|k| format!("{}-offline-{node}-{k}", bench.prefix)));
        named += names.len() as u64;
        if let Some(id) = pubs.submit_job(node, names, users).await? {
            jobs.push((node, id));
        }
    }
    for (node, id) in &jobs {
        loop {
            let status = pubs.node(*node).job(id).await?;
            match status.state.as_str() {
                "done" => break,
                "failed" => anyhow::bail!("job {id} failed: {:?}", status.error),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    let stored_seconds = started.elapsed().as_secs_f64();
    let after = bench.drain(goal, Duration::from_secs(120)).await?;
    let r = round_of("job", named, before.advanced, &after, started_ns, stored_seconds);
    eprintln!(
        "job {}: {} users stored in {:.2} s; {} deliveries, the last after {:.2} s ({:.0}/s)",
        round + 1,
        thousands(named),
        stored_seconds,
        thousands(r.deliveries),
        r.last_delivery_seconds,
        r.deliveries_per_sec
    );
    Ok(r)
}

/// Every connected user once, `--batch` per publish, all at once.
async fn burst_round(
    bench: &Bench,
    pubs: &Arc<Publishers>,
    by_node: &[Vec<u32>],
    args: &Args,
) -> anyhow::Result<Round> {
    let before = bench.fleet.sync().await?;
    let goal = pubs.expected.total() + by_node.iter().map(|v| v.len() as u64).sum::<u64>();
    let started_ns = unix_ns();
    let started = tokio::time::Instant::now();
    let mut jobs = Vec::new();
    for (node, users) in by_node.iter().enumerate() {
        for chunk in users.chunks(args.batch.clamp(1, 1000)) {
            jobs.push(Job { node, users: chunk.to_vec(), sent_ns: started_ns, pad: args.publishing.payload_bytes });
        }
    }
    let named = by_node.iter().map(|v| v.len() as u64).sum();
    pubs.run_all(jobs, args.publishing.publishers).await;
    let stored_seconds = started.elapsed().as_secs_f64();
    let after = bench.drain(goal, Duration::from_secs(120)).await?;
    let r = round_of("burst", named, before.advanced, &after, started_ns, stored_seconds);
    eprintln!(
        "burst: {} users stored in {:.2} s ({:.0}/s); the last delivery after {:.2} s ({:.0} deliveries/s)",
        thousands(named),
        stored_seconds,
        r.stored_per_sec,
        r.last_delivery_seconds,
        r.deliveries_per_sec
    );
    Ok(r)
}

fn round_of(
    kind: &'static str,
    audience: u64,
    advanced_before: u64,
    after: &crate::fleet::Stats,
    started_ns: u64,
    stored_seconds: f64,
) -> Round {
    let deliveries = after.advanced - advanced_before;
    let last = after.last_delivery_ns.saturating_sub(started_ns) as f64 / 1e9;
    Round {
        kind,
        audience,
        deliveries,
        stored_seconds,
        last_delivery_seconds: last,
        deliveries_per_sec: deliveries as f64 / last.max(1e-6),
        stored_per_sec: audience as f64 / stored_seconds.max(1e-6),
    }
}

fn write(bench: &Bench, r: &Result, jobs: &Histogram<u64>, bursts: &Histogram<u64>) -> anyhow::Result<()> {
    let chart = Chart::new("Publish → deliver by percentile", "percentile", "ms", XScale::Percentile)
        .series("jobs (202)", percentile_curve(jobs))
        .series("bursts (201, batched)", percentile_curve(bursts));
    bench.run.write_file("latency.svg", &chart.render())?;
    let mut md = bench.run.header(r.label.as_deref());
    md += &format!(
        "{} clients ({} open) in {} processes over {} node(s).\n\n",
        thousands(r.clients.connections as u64),
        thousands(r.connected.open),
        r.clients.processes,
        r.clients.nodes.len()
    );
    md += "| round | users named | deliveries | stored in s | last delivery after s | deliveries/s | stored/s |\n|---|---|---|---|---|---|---|\n";
    for x in &r.rounds {
        md += &format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} |\n",
            x.kind,
            thousands(x.audience),
            thousands(x.deliveries),
            x.stored_seconds,
            x.last_delivery_seconds,
            x.deliveries_per_sec,
            x.stored_per_sec
        );
    }
    md += &format!("\nServer CPU over the run: {:.0}% of one core.\n\n", r.server.cpu_percent);
    md += Percentiles::HEADER;
    md += &format!(
        "\n{}\n{}\n\n",
        r.job_latency.row("jobs: publish → deliver"),
        r.burst_latency.row("bursts: publish → deliver")
    );
    md += &server_tables("over the rounds", &r.server);
    md += &r.verification.paragraph();
    md += &targets_table(&r.targets);
    md += "![latency by percentile](latency.svg)\n";
    bench.run.write_file("summary.md", &md)?;
    bench.run.write_json(r)?;
    Ok(())
}
