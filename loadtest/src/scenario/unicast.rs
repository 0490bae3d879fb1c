//! `unicast`: open-loop publishing at a fixed rate to random connected users
//! (one user per publish, or `--batch` users per publish with `user_ids`).
//! Each payload carries its scheduled send time; clients record publish →
//! deliver latency, and every user's seqs are checked against what the
//! server acknowledged.

use std::time::Duration;

use serde::Serialize;

use super::{exit_code, Bench, ClientSetup, Connected, Started};
use crate::args::{Clients, Common};
use crate::chart::{Chart, XScale};
use crate::hist::{merge, percentile_curve, thousands, Percentiles};
use crate::procstat::{server_tables, ServerUsage};
use crate::progress::{mean_over, Sample};
use crate::publish::{open_loop, OpenLoop, Plan, PublishStats};
use crate::report::{targets_table, Target};
use crate::verify::{verify, Verification};

pub struct Args {
    pub common: Common,
    pub clients: Clients,
    pub plan: Plan,
}

#[derive(Serialize)]
struct Result {
    scenario: &'static str,
    started_at: String,
    commit: Option<String>,
    label: Option<String>,
    clients: ClientSetup,
    rate: f64,
    batch: usize,
    publishers: usize,
    payload_pad_bytes: usize,
    cross_node: bool,
    connected: Connected,
    open_loop: OpenLoop,
    published: PublishStats,
    /// Acknowledged notifications per second of publishing.
    published_per_sec: f64,
    /// Deliveries per second, first publish to last delivery.
    deliveries_per_sec: f64,
    latency: Percentiles,
    http_round_trip: Percentiles,
    server: ServerUsage,
    verification: Verification,
    targets: Vec<Target>,
    timeline: Vec<Sample>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let Started { bench, setup, pubs, expected, connected } =
        Bench::start_publishing("unicast", &args.common, &args.clients).await?;
    let targets = bench.targets_by_node(&bench.fleet.reports().await?);

    bench.progress.phase("publish");
    let plan = &args.plan;
    eprintln!(
        "publishing {} notifications/s ({} per publish) for {}",
        plan.rate,
        plan.batch,
        humantime::format_duration(plan.duration)
    );
    let before = bench.fleet.sync().await?;
    let from = bench.phase_start().await;
    let started_ns = crate::fleet::worker::unix_ns();
    let open_loop = open_loop(&pubs, plan, &targets).await;
    let published = pubs.stats();
    let after = bench.drain(expected.total(), Duration::from_secs(60)).await?;
    let timeline = bench.progress.timeline();
    let server = bench.usage(&from, &timeline).await;
    let reports = bench.fleet.reports().await?;
    let verification = verify(&reports, &expected, published.errors);
    verification.shout();

    let delivered = after.delivered - before.delivered;
    let delivery_secs = (after.last_delivery_ns.saturating_sub(started_ns)) as f64 / 1e9;
    let latency = Percentiles::of(&merge(reports.iter().map(|r| &r.latency)));
    let http_round_trip = Percentiles::of(&pubs.round_trip.lock().unwrap());
    let published_per_sec = published.notifications as f64 / open_loop.seconds.max(1e-3);
    let deliveries_per_sec = delivered as f64 / delivery_secs.max(1e-3);
    let result = Result {
        scenario: "unicast",
        started_at: bench.run.started_at.clone(),
        commit: bench.run.commit.clone(),
        label: args.common.label.clone(),
        clients: setup,
        rate: plan.rate,
        batch: plan.batch,
        publishers: plan.concurrency,
        payload_pad_bytes: plan.pad,
        cross_node: plan.cross_node,
        connected,
        targets: targets_for(plan, published_per_sec, deliveries_per_sec, &latency, args.common.label.as_deref()),
        open_loop,
        published,
        published_per_sec,
        deliveries_per_sec,
        latency,
        http_round_trip,
        server,
        verification,
        timeline,
    };
    let curve = |h: &hdrhistogram::Histogram<u64>| percentile_curve(h);
    let chart = Chart::new("Latency by percentile", "percentile", "ms", XScale::Percentile)
        .series("publish → deliver", curve(&merge(reports.iter().map(|r| &r.latency))))
        .series("HTTP publish round trip", curve(&pubs.round_trip.lock().unwrap()));
    bench.run.write_file("latency.svg", &chart.render())?;
    bench.run.write_file("summary.md", &summary(&bench, &result))?;
    bench.run.write_json(&result)?;
    let ok = result.verification.ok;
    let run = bench.finish().await?;
    crate::report::announce(&run.dir);
    Ok(exit_code(ok))
}

fn targets_for(plan: &Plan, published: f64, delivered: f64, l: &Percentiles, label: Option<&str>) -> Vec<Target> {
    let on = label.map_or(String::new(), |l| format!(" ({l})"));
    let single = plan.batch == 1;
    vec![
        Target::new("unicast deliveries/s", "≥ 100,000/s", format!("{delivered:.0}/s"), delivered >= 100_000.0)
            .when(plan.rate >= 100_000.0, &format!("ran at {:.0}/s", plan.rate)),
        Target::new(
            "publish → deliver at 5k publishes/s via PostgreSQL+Redis",
            "p50 ≤ 2 ms, p99 ≤ 10 ms, p99.9 ≤ 50 ms",
            format!("p50 {:.2}, p99 {:.2}, p99.9 {:.2} ms{on}", l.p50_ms, l.p99_ms, l.p999_ms),
            l.p50_ms <= 2.0 && l.p99_ms <= 10.0 && l.p999_ms <= 50.0,
        )
        .when(single && (4_900.0..=5_500.0).contains(&plan.rate), "not a single-user run at 5k/s"),
        Target::new("single-user publishes/s", "≥ 20,000/s", format!("{published:.0}/s"), published >= 19_800.0)
            .when(single && plan.rate >= 20_000.0, "not a single-user run at ≥ 20k/s"),
        Target::new("notifications/s batched", "≥ 50,000/s", format!("{published:.0}/s"), published >= 49_500.0)
            .when(!single && plan.rate >= 50_000.0, "not a batched run at ≥ 50k/s"),
    ]
}

fn summary(bench: &Bench, r: &Result) -> String {
    let mut md = bench.run.header(r.label.as_deref());
    md += &format!(
        "{} clients ({} open) in {} processes over {} node(s); {} notifications/s requested, {} user(s) per publish, {} publishers{}.\n\n",
        thousands(r.clients.connections as u64),
        thousands(r.connected.open),
        r.clients.processes,
        r.clients.nodes.len(),
        r.rate,
        r.batch,
        r.publishers,
        if r.cross_node { ", published through the next node" } else { "" }
    );
    md += "| measure | value |\n|---|---|\n";
    md += &format!(
        "| published (acknowledged) | {} notifications in {} requests, {} errors {:?} |\n",
        thousands(r.published.notifications),
        thousands(r.published.requests),
        r.published.errors,
        r.published.error_kinds
    );
    md += &format!(
        "| publish rate achieved | {:.0} notifications/s over {:.1} s |\n",
        r.published_per_sec, r.open_loop.seconds
    );
    md += &format!("| longest wait for a free publisher | {:.1} ms |\n", r.open_loop.max_queue_ms);
    if r.open_loop.stopped_lagging {
        md += "| **stopped early** | publishes fell more than --max-lag behind: the rate was not sustainable |\n";
    }
    md += &format!("| deliveries | {:.0}/s |\n", r.deliveries_per_sec);
    md += &format!("| server CPU | {:.0}% of one core |\n", r.server.cpu_percent);
    md += &format!(
        "| load generator CPU / machine busy, while publishing | {:.0}% of one core / {:.0}% of all cores |\n\n",
        mean_over(&r.timeline, "publish", |s| s.loadgen_cpu_percent),
        mean_over(&r.timeline, "publish", |s| s.machine_cpu_percent)
    );
    md += Percentiles::HEADER;
    md += "\n";
    md += &r.latency.row("publish → deliver");
    md += "\n";
    md += &r.http_round_trip.row("HTTP publish round trip");
    md += "\n\n";
    md += &server_tables("from the first publish to the last delivery", &r.server);
    md += &r.verification.paragraph();
    md += &targets_table(&r.targets);
    md += "![latency by percentile](latency.svg)\n";
    md
}
