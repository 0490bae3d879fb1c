//! `idle`: open N authenticated connections at a ramp rate and hold them.
//! Reports handshakes/s, failures, drops during the hold, and the server's
//! RSS per connection (RSS growth of the herald processes / connections).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::{Bench, ClientSetup, Connected};
use crate::args::{Clients, Common};
use crate::chart::{Chart, XScale};
use crate::hist::{merge, thousands, Percentiles};
use crate::procstat::{server_tables, ServerUsage};
use crate::progress::Sample;
use crate::report::{targets_table, Target};

pub struct Args {
    pub common: Common,
    pub clients: Clients,
    pub duration: Duration,
}

#[derive(Serialize)]
struct Result {
    scenario: &'static str,
    started_at: String,
    commit: Option<String>,
    label: Option<String>,
    clients: ClientSetup,
    hold_seconds: f64,
    connected: Connected,
    /// Clients open at the end of the hold.
    open_at_end: u64,
    /// Clients open per node after the ramp.
    open_per_node: Vec<u64>,
    /// Sessions that ended during the hold (server close, error).
    drops: u64,
    closes: BTreeMap<u16, u64>,
    failure_kinds: BTreeMap<String, u64>,
    handshake_latency: Percentiles,
    peak_handshakes_per_sec: f64,
    server: ServerUsage,
    server_rss_per_connection_kib: Option<f64>,
    client_rss_per_connection_kib: f64,
    targets: Vec<Target>,
    timeline: Vec<Sample>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let (bench, setup) = Bench::start("idle", &args.common, &args.clients, &args.common.prefix(), None).await?;
    let connected = bench.connect_all(args.clients.ramp_rate).await?;
    // Let the ramp's transient allocations settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ramped = bench.fleet.sync().await?;
    let drops_before = ramped.drops;
    let hold_from = bench.phase_start().await;
    let reports = bench.fleet.reports().await?;
    let mut open_per_node = vec![0u64; bench.nodes];
    for (j, _) in reports.iter().flat_map(|r| r.clients.iter().zip(&r.start)).filter(|(_, s)| **s >= 0) {
        open_per_node[*j as usize % bench.nodes] += 1;
    }

    bench.progress.phase("hold");
    eprintln!("holding {} connections for {}", ramped.open, humantime::format_duration(args.duration));
    let hold_started = tokio::time::Instant::now();
    tokio::time::sleep(args.duration).await;
    let hold_seconds = hold_started.elapsed().as_secs_f64();
    let end = bench.fleet.sync().await?;
    let reports = bench.fleet.reports().await?;
    let timeline = bench.progress.timeline();
    let server = bench.usage(&hold_from, &timeline).await;

    let mut closes = BTreeMap::new();
    let mut failure_kinds = BTreeMap::new();
    for r in &reports {
        r.closes.iter().for_each(|(k, v)| *closes.entry(*k).or_default() += *v);
        r.failure_kinds.iter().for_each(|(k, v)| *failure_kinds.entry(k.clone()).or_default() += v);
    }
    let open = ramped.open.max(1) as f64;
    let server_per_conn =
        (!bench.herald.is_empty()).then(|| server.rss_peak_kib.saturating_sub(bench.rss_before_kib) as f64 / open);
    let peak_rate = timeline
        .windows(2)
        .map(|w| (w[1].handshakes.saturating_sub(w[0].handshakes)) as f64 / (w[1].t - w[0].t).max(1e-3))
        .fold(0.0, f64::max);
    let drops = end.drops - drops_before;
    let result = Result {
        scenario: "idle",
        started_at: bench.run.started_at.clone(),
        commit: bench.run.commit.clone(),
        label: args.common.label.clone(),
        targets: targets(setup.connections, &open_per_node, drops, hold_seconds, server_per_conn),
        clients: setup,
        hold_seconds,
        open_at_end: end.open,
        open_per_node,
        drops,
        closes,
        failure_kinds,
        handshake_latency: Percentiles::of(&merge(reports.iter().map(|r| &r.handshake))),
        peak_handshakes_per_sec: peak_rate,
        server,
        server_rss_per_connection_kib: server_per_conn,
        client_rss_per_connection_kib: ramped.rss_kib as f64 / open,
        connected,
        timeline,
    };
    write(&bench, &result)?;
    let run = bench.finish().await?;
    crate::report::announce(&run.dir);
    Ok(0)
}

fn targets(requested: usize, per_node: &[u64], drops: u64, hold_seconds: f64, per_conn: Option<f64>) -> Vec<Target> {
    let nodes = per_node.len();
    let asked_per_node = requested / nodes.max(1);
    let least = per_node.iter().copied().min().unwrap_or(0);
    let total: u64 = per_node.iter().sum();
    vec![
        Target::new("idle connections per node process", "≥ 19,500", thousands(least), least >= 19_500)
            .when(asked_per_node >= 19_500, &format!("ran {} per node", thousands(asked_per_node as u64))),
        Target::new("idle connections across 6+ node processes", "≥ 100,000", thousands(total), total >= 100_000).when(
            nodes >= 6 && requested >= 100_000,
            &format!("ran {} over {nodes} node(s)", thousands(requested as u64)),
        ),
        Target::new("drops during the hold", "0 over 10 min", format!("{drops} in {:.0} s", hold_seconds), drops == 0)
            .when(hold_seconds >= 599.0 || drops > 0, &format!("held {:.0} s, not 10 min", hold_seconds)),
        Target::new(
            "server RSS per idle connection",
            "≤ 8 KiB",
            per_conn.map_or("-".into(), |k| format!("{k:.1} KiB")),
            per_conn.is_some_and(|k| k <= 8.0),
        )
        .when(per_conn.is_some(), "no --herald-pid"),
    ]
}

fn write(bench: &Bench, r: &Result) -> anyhow::Result<()> {
    let t0 = r.timeline.first().map_or(0.0, |s| s.t);
    let chart = Chart::new("Connections over time", "seconds", "connections", XScale::Linear)
        .series("open", r.timeline.iter().map(|s| (s.t - t0, s.open as f64)).collect())
        .series("handshakes (cumulative)", r.timeline.iter().map(|s| (s.t - t0, s.handshakes as f64)).collect())
        .series("drops", r.timeline.iter().map(|s| (s.t - t0, s.drops as f64)).collect());
    bench.run.write_file("connections.svg", &chart.render())?;
    let mut md = bench.run.header(r.label.as_deref());
    md += &format!(
        "{} clients in {} processes over {} node(s); ramp {} handshakes/s requested.\n\n",
        thousands(r.clients.connections as u64),
        r.clients.processes,
        r.clients.nodes.len(),
        r.clients.ramp_rate
    );
    md += "| measure | value |\n|---|---|\n";
    md += &format!("| open after the ramp | {} |\n", thousands(r.connected.open));
    md += &format!(
        "| open per node | {} |\n",
        r.open_per_node.iter().map(|n| thousands(*n)).collect::<Vec<_>>().join(", ")
    );
    md += &format!(
        "| ramp | {:.1} s, {:.0} handshakes/s (peak second {:.0}) |\n",
        r.connected.seconds, r.connected.per_sec, r.peak_handshakes_per_sec
    );
    md += &format!(
        "| handshake p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n",
        r.handshake_latency.p50_ms, r.handshake_latency.p99_ms, r.handshake_latency.max_ms
    );
    md += &format!("| failed handshake attempts | {} {:?} |\n", r.connected.failures, r.failure_kinds);
    md += &format!("| hold | {:.0} s |\n", r.hold_seconds);
    md += &format!("| drops during the hold | {} {:?} |\n", r.drops, r.closes);
    md += &format!("| open at the end | {} |\n", thousands(r.open_at_end));
    if let Some(k) = r.server_rss_per_connection_kib {
        md += &format!(
            "| server RSS before / peak / end | {} / {} / {} MiB |\n| server RSS per connection | {k:.2} KiB |\n| server CPU during the hold | {:.1}% |\n",
            r.server.rss_before_kib / 1024,
            r.server.rss_peak_kib / 1024,
            r.server.rss_after_kib / 1024,
            r.server.cpu_percent
        );
    }
    md += &format!("| load generator RSS per connection | {:.1} KiB |\n\n", r.client_rss_per_connection_kib);
    md += &server_tables("during the hold", &r.server);
    md += &targets_table(&r.targets);
    md += "![connections over time](connections.svg)\n";
    bench.run.write_file("summary.md", &md)?;
    bench.run.write_json(r)?;
    Ok(())
}
