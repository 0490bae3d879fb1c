//! The scenarios, one module each, and what they share: starting the
//! clients, waiting for them, and the end of a run.
//!
//! - [`idle`]: hold many authenticated connections.
//! - [`unicast`]: open-loop publishing to random users; publish → deliver latency.
//! - [`fanout`]: large-audience jobs and bursts; deliveries/s, time to the last delivery.
//! - [`storm`]: everyone drops, misses notifications, and comes back with `since`.
//! - [`slow`]: clients that stop reading get 1013 and recover; the others' latency.

pub mod fanout;
pub mod idle;
pub mod slow;
pub mod storm;
pub mod unicast;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::args::{Clients, Common};
use crate::fleet::{Fleet, FleetSpec, Report, Stats};
use crate::procstat::{ByProgram, Herald, PhaseStart, ServerUsage};
use crate::progress::{Progress, Sample};
use crate::publish::Publishers;
use crate::report::Run;
use crate::scrape::Totals;
use crate::verify::Expected;

/// What [`Bench::start_publishing`] hands a scenario.
pub struct Started {
    pub bench: Bench,
    pub setup: ClientSetup,
    pub pubs: Arc<Publishers>,
    pub expected: Arc<Expected>,
    pub connected: Connected,
}

/// A scenario's running parts.
pub struct Bench {
    pub run: Run,
    pub fleet: Arc<Fleet>,
    pub herald: Herald,
    pub progress: Progress,
    pub prefix: String,
    pub connections: usize,
    pub nodes: usize,
    /// The nodes' HTTP addresses, for their `/metrics`.
    pub http_urls: Vec<String>,
    /// Server RSS before any client connected.
    pub rss_before_kib: u64,
}

/// The clients' side of a run, for the results.
#[derive(Debug, Clone, Serialize)]
pub struct ClientSetup {
    pub connections: usize,
    pub processes: usize,
    pub nodes: Vec<String>,
    pub source_ips: Vec<String>,
    pub prefix: String,
    pub ramp_rate: f64,
}

impl Bench {
    /// Creates the run folder and starts the worker processes.
    pub async fn start(
        scenario: &'static str,
        common: &Common,
        clients: &Clients,
        prefix: &str,
        pubs: Option<Arc<Publishers>>,
    ) -> anyhow::Result<(Bench, ClientSetup)> {
        let run = Run::create(scenario, common.out.clone())?;
        let prefix = prefix.to_string();
        let urls = common.ws_urls()?;
        let source_ips = clients.source_ips()?;
        let processes = clients.processes();
        if clients.connections.div_ceil(processes) > 19_900 {
            eprintln!("warning: over 19,900 clients per process; raise --processes (the file limit is ~20,000)");
        }
        let herald = Herald::new(common.herald_pids.clone());
        let rss_before_kib = herald.sample().rss_kib;
        let spec = FleetSpec {
            connections: clients.connections,
            processes,
            urls: urls.clone(),
            source_ips: source_ips.clone(),
            prefix: prefix.clone(),
            jwt_secret: common.jwt_secret.clone(),
            max_inflight: clients.max_inflight,
        };
        let fleet = Fleet::start(spec).await?;
        let progress = Progress::start(scenario, fleet.clone(), herald.clone(), pubs);
        let setup = ClientSetup {
            connections: clients.connections,
            processes,
            nodes: common.http_urls(),
            source_ips: source_ips.iter().map(|ip| ip.to_string()).collect(),
            prefix: prefix.clone(),
            ramp_rate: clients.ramp_rate,
        };
        eprintln!(
            "{scenario}: {} clients in {processes} processes over {} nodes, users {prefix}-*, results in {}",
            clients.connections,
            urls.len(),
            run.dir.display()
        );
        let bench = Bench {
            run,
            fleet,
            herald,
            progress,
            prefix,
            connections: clients.connections,
            nodes: urls.len(),
            http_urls: common.http_urls(),
            rss_before_kib,
        };
        Ok((bench, setup))
    }

    /// The start every publishing scenario shares: publishers counting what
    /// each user should get, the worker processes, every client connected.
    pub async fn start_publishing(
        scenario: &'static str,
        common: &Common,
        clients: &Clients,
    ) -> anyhow::Result<Started> {
        let prefix = common.prefix();
        let expected = Arc::new(Expected::new(clients.connections));
        let pubs = Publishers::new(&common.http_urls(), &common.api_key, &prefix, expected.clone());
        let (bench, setup) = Bench::start(scenario, common, clients, &prefix, Some(pubs.clone())).await?;
        let connected = bench.connect_all(clients.ramp_rate).await?;
        Ok(Started { bench, setup, pubs, expected, connected })
    }

    /// Connects every client at `rate`, waiting until all are open (or stuck).
    pub async fn connect_all(&self, rate: f64) -> anyhow::Result<Connected> {
        self.progress.phase("connect");
        let started = tokio::time::Instant::now();
        self.fleet.connect(rate).await?;
        let n = self.connections as u64;
        let limit = Duration::from_secs_f64(if rate > 0.0 { n as f64 / rate * 3.0 } else { 0.0 } + 120.0);
        let s = self.fleet.wait_until(limit, Duration::from_secs(20), |s| s.open >= n).await?;
        let seconds = started.elapsed().as_secs_f64();
        let connected =
            Connected { open: s.open, failures: s.failures, seconds, per_sec: s.handshakes as f64 / seconds };
        eprintln!(
            "{} of {} clients open in {:.1} s ({:.0} handshakes/s), {} failed attempts",
            s.open, n, seconds, connected.per_sec, s.failures
        );
        Ok(connected)
    }

    /// Clients per node, for those open now: from a report's `start` cells.
    pub fn targets_by_node(&self, reports: &[Report]) -> Vec<Vec<u32>> {
        let mut by_node = vec![Vec::new(); self.nodes];
        for r in reports {
            for (&j, &start) in r.clients.iter().zip(&r.start) {
                if start >= 0 {
                    by_node[j as usize % self.nodes].push(j);
                }
            }
        }
        for v in &mut by_node {
            v.sort_unstable();
        }
        by_node
    }

    /// Waits for deliveries to reach `expected` (all of `Stats::advanced`), or to stall.
    pub async fn drain(&self, expected: u64, limit: Duration) -> anyhow::Result<Stats> {
        self.progress.phase("drain");
        self.fleet.wait_until(limit, Duration::from_secs(10), |s| s.advanced >= expected).await
    }

    /// Marks the start of the phase [`usage`](Self::usage) measures.
    pub async fn phase_start(&self) -> PhaseStart {
        let commits = Totals::read(&self.http_urls).await;
        PhaseStart {
            herald: self.herald.sample(),
            programs: ByProgram::snapshot(),
            commits,
            written: self.herald.written(),
        }
    }

    /// Server usage over a phase that began at `from`; every program's CPU
    /// and the nodes' group commits too.
    pub async fn usage(&self, from: &PhaseStart, timeline: &[Sample]) -> ServerUsage {
        let cpu_by_program = ByProgram::snapshot().since(&from.programs, 0.05);
        let group_commits = Totals::phase_since(from.commits.as_ref(), &self.http_urls).await;
        let now = self.herald.sample();
        let peak = timeline.iter().map(|s| s.herald_rss_kib).max().unwrap_or(0).max(now.rss_kib);
        ServerUsage {
            pids: self.herald.pids().to_vec(),
            rss_before_kib: self.rss_before_kib,
            rss_peak_kib: peak,
            rss_after_kib: now.rss_kib,
            cpu_percent: self.herald.cpu_percent(&from.herald, &now),
            cpu_by_program,
            group_commits,
            disk_written_bytes: from.written.zip(self.herald.written()).map(|(a, b)| b.saturating_sub(a)),
        }
    }

    /// Stops the clients (close 1000) and the progress line.
    pub async fn finish(self) -> anyhow::Result<Run> {
        self.fleet.quit().await?;
        drop(self.progress);
        Ok(self.run)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Connected {
    pub open: u64,
    pub failures: u64,
    pub seconds: f64,
    pub per_sec: f64,
}

/// The process exit status for a run: 1 when a delivery check failed.
pub fn exit_code(ok: bool) -> i32 {
    if ok {
        0
    } else {
        1
    }
}
