//! `storm`: C clients connected; all drop at once (no close frame, as in a
//! network failure); M notifications per user are published while they are
//! away; all reconnect at once with `since`. Measures the time until every
//! client has caught up, per-client catch-up times, and checks that each got
//! exactly the seqs it missed, in order.

use std::time::Duration;

use serde::Serialize;

use super::{exit_code, Bench, ClientSetup, Connected, Started};
use crate::args::{Clients, Common};
use crate::chart::{Chart, XScale};
use crate::cli::Publishing;
use crate::fleet::worker::unix_ns;
use crate::fleet::Command;
use crate::hist::{cdf, merge, thousands, Percentiles};
use crate::procstat::{server_tables, ServerUsage};
use crate::progress::Sample;
use crate::publish::{Job, PublishStats};
use crate::report::{targets_table, Target};
use crate::scrape::{GroupCommits, Totals};
use crate::verify::{verify, Verification};

pub struct Args {
    pub common: Common,
    pub clients: Clients,
    pub publishing: Publishing,
    pub missed: usize,
    pub batch: usize,
    pub reconnect_rate: f64,
}

#[derive(Serialize)]
struct Result {
    scenario: &'static str,
    started_at: String,
    commit: Option<String>,
    label: Option<String>,
    clients: ClientSetup,
    missed_per_user: usize,
    connected: Connected,
    published: PublishStats,
    publish_seconds: f64,
    publish_per_sec: f64,
    /// How the nodes grouped the missed notifications into commits.
    publish_commits: Option<GroupCommits>,
    reconnect_rate: f64,
    /// Clients that caught up, of those that had been connected.
    caught_up: u64,
    /// The reconnect command → the last client caught up.
    all_caught_up_seconds: f64,
    reconnect_failures: u64,
    /// Reconnect handshakes: TCP connect → welcome.
    reconnect_handshake: Percentiles,
    /// Per client: its reconnect attempt → caught up.
    catch_up: Percentiles,
    /// Per client: the reconnect command → caught up.
    catch_up_since_storm: Percentiles,
    /// From the reconnect command to the last delivery (`cpu_by_program`
    /// included: herald, the store, the broker, this tool).
    server: ServerUsage,
    verification: Verification,
    targets: Vec<Target>,
    timeline: Vec<Sample>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let Started { bench, setup, pubs, expected, connected } =
        Bench::start_publishing("storm", &args.common, &args.clients).await?;
    let first = bench.fleet.reports().await?;
    let by_node = bench.targets_by_node(&first);
    let first_handshakes = merge(first.iter().map(|r| &r.handshake));
    let clients: u64 = by_node.iter().map(|v| v.len() as u64).sum();

    bench.progress.phase("drop");
    bench.fleet.broadcast(&Command::Drop).await?;
    bench.fleet.wait_until(Duration::from_secs(30), Duration::from_secs(10), |s| s.open == 0).await?;
    // Give the server a moment to see the sockets close.
    tokio::time::sleep(Duration::from_secs(1)).await;

    bench.progress.phase("publish");
    let commits_before = Totals::read(&bench.http_urls).await;
    let started = tokio::time::Instant::now();
    let mut jobs = Vec::new();
    for _ in 0..args.missed {
        for (node, users) in by_node.iter().enumerate() {
            for chunk in users.chunks(args.batch.clamp(1, 1000)) {
                jobs.push(Job { node, users: chunk.to_vec(), sent_ns: unix_ns(), pad: args.publishing.payload_bytes });
            }
        }
    }
    pubs.run_all(jobs, args.publishing.publishers).await;
    let publish_seconds = started.elapsed().as_secs_f64();
    let published = pubs.stats();
    let publish_commits = Totals::phase_since(commits_before.as_ref(), &bench.http_urls).await;
    eprintln!(
        "{} notifications published in {:.1} s while everyone was away",
        thousands(published.notifications),
        publish_seconds
    );

    bench.progress.phase("reconnect");
    let before = bench.fleet.sync().await?;
    let from = bench.phase_start().await;
    let storm_ns = unix_ns();
    bench.fleet.connect(args.reconnect_rate).await?;
    let after =
        bench.fleet.wait_until(Duration::from_secs(300), Duration::from_secs(20), |s| s.caught_up >= clients).await?;
    let all_caught_up_seconds = after.last_caught_up_ns.saturating_sub(storm_ns) as f64 / 1e9;
    eprintln!("{} of {} clients caught up; the last after {:.2} s", after.caught_up, clients, all_caught_up_seconds);
    let drained = bench.drain(expected.total(), Duration::from_secs(30)).await?;
    let timeline = bench.progress.timeline();
    let server = bench.usage(&from, &timeline).await;
    let reports = bench.fleet.reports().await?;
    let verification = verify(&reports, &expected, published.errors);
    verification.shout();

    let per_client = merge(reports.iter().map(|r| &r.catch_up));
    let mut reconnects = merge(reports.iter().map(|r| &r.handshake));
    reconnects.subtract(&first_handshakes).ok();
    let since_storm = merge(reports.iter().map(|r| &r.catch_up_since_command));
    let all_in = after.caught_up >= clients;
    let target = Target::new(
        "storm: 20k clients × 50 missed, all caught up",
        "≤ 3 s",
        match all_in {
            true => format!("{all_caught_up_seconds:.2} s"),
            false => format!("{} of {} caught up", after.caught_up, clients),
        },
        all_in && all_caught_up_seconds <= 3.0,
    )
    .when(clients >= 20_000 && args.missed >= 50, &format!("ran {} clients × {}", thousands(clients), args.missed));
    let result = Result {
        scenario: "storm",
        started_at: bench.run.started_at.clone(),
        commit: bench.run.commit.clone(),
        label: args.common.label.clone(),
        clients: setup,
        missed_per_user: args.missed,
        connected,
        publish_per_sec: published.notifications as f64 / publish_seconds.max(1e-6),
        published,
        publish_seconds,
        publish_commits,
        reconnect_rate: args.reconnect_rate,
        caught_up: after.caught_up,
        all_caught_up_seconds,
        reconnect_failures: drained.failures - before.failures,
        reconnect_handshake: Percentiles::of(&reconnects),
        catch_up: Percentiles::of(&per_client),
        catch_up_since_storm: Percentiles::of(&since_storm),
        server,
        verification,
        targets: vec![target],
        timeline,
    };
    let chart = Chart::new("Clients caught up", "ms", "share of clients caught up", XScale::Linear)
        .series("since the storm began", cdf(&since_storm))
        .series("since the client's own reconnect", cdf(&per_client));
    bench.run.write_file("catch-up.svg", &chart.render())?;
    bench.run.write_file("summary.md", &summary(&bench, &result))?;
    bench.run.write_json(&result)?;
    let ok = result.verification.ok;
    let run = bench.finish().await?;
    crate::report::announce(&run.dir);
    Ok(exit_code(ok))
}

fn summary(bench: &Bench, r: &Result) -> String {
    let mut md = bench.run.header(r.label.as_deref());
    md += &format!(
        "{} clients ({} open) in {} processes over {} node(s); all dropped, {} notifications each published meanwhile, then all reconnected with `since`{}.\n\n",
        thousands(r.clients.connections as u64),
        thousands(r.connected.open),
        r.clients.processes,
        r.clients.nodes.len(),
        r.missed_per_user,
        if r.reconnect_rate > 0.0 { format!(" at {} reconnects/s", r.reconnect_rate) } else { " at once".into() }
    );
    md += "| measure | value |\n|---|---|\n";
    md += &format!(
        "| published while away | {} in {:.1} s ({:.0}/s), {} errors |\n",
        thousands(r.published.notifications),
        r.publish_seconds,
        r.publish_per_sec,
        r.published.errors
    );
    if let Some(c) = &r.publish_commits {
        md += &format!(
            "| their group commits | {} of {:.1} notifications each, {:.2} ms each on average |\n",
            thousands(c.commits),
            c.per_commit,
            c.mean_commit_ms
        );
    }
    md += &format!("| clients caught up | {} |\n", thousands(r.caught_up));
    md += &format!("| all caught up after | {:.2} s |\n", r.all_caught_up_seconds);
    md += &format!("| failed reconnect attempts | {} |\n", r.reconnect_failures);
    md += &format!("| server CPU during the storm | {:.0}% of one core |\n\n", r.server.cpu_percent);
    md += Percentiles::HEADER;
    md += &format!(
        "\n{}\n{}\n{}\n\n",
        r.reconnect_handshake.row("reconnect handshake (TCP connect → welcome)"),
        r.catch_up.row("catch-up per client (own reconnect → caught up)"),
        r.catch_up_since_storm.row("catch-up since the storm began")
    );
    md += &server_tables("from the reconnect to the last delivery", &r.server);
    md += &r.verification.paragraph();
    md += &targets_table(&r.targets);
    md += "![clients caught up over time](catch-up.svg)\n";
    md
}
