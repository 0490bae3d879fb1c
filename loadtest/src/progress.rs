//! The once-a-second progress line on stderr, and the timeline it samples
//! (kept for the results and the charts).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::fleet::Fleet;
use crate::hist::thousands;
use crate::procstat::{self, Herald};
use crate::publish::Publishers;

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub phase: String,
    pub open: u64,
    pub handshakes: u64,
    pub failures: u64,
    pub drops: u64,
    pub delivered: u64,
    pub published: u64,
    pub herald_rss_kib: u64,
    pub herald_cpu_percent: f64,
    pub clients_rss_kib: u64,
    /// The load generator (coordinator and workers), percent of one core.
    pub loadgen_cpu_percent: f64,
    /// The whole machine, percent of all cores.
    pub machine_cpu_percent: f64,
}

/// The progress printer; dropping it stops the line.
pub struct Progress {
    phase: Arc<Mutex<String>>,
    timeline: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(scenario: &'static str, fleet: Arc<Fleet>, herald: Herald, pubs: Option<Arc<Publishers>>) -> Progress {
        let phase = Arc::new(Mutex::new(String::from("start")));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let (p, tl) = (phase.clone(), timeline.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut prev: Option<Sample> = None;
            let mut prev_cpu = herald.sample();
            let loadgen_ticks = |s: &crate::fleet::Stats| s.cpu_ticks + procstat::cpu_ticks("self").unwrap_or(0);
            let mut prev_loadgen = (loadgen_ticks(&fleet.stats()), Instant::now());
            let mut prev_machine = procstat::machine_ticks().unwrap_or((0, 0));
            loop {
                tick.tick().await;
                let s = fleet.stats();
                let cpu = herald.sample();
                let loadgen = (loadgen_ticks(&s), Instant::now());
                let loadgen_cpu_percent = (loadgen.0.saturating_sub(prev_loadgen.0)) as f64
                    / procstat::clock_ticks()
                    / loadgen.1.duration_since(prev_loadgen.1).as_secs_f64().max(1e-3)
                    * 100.0;
                prev_loadgen = loadgen;
                let machine = procstat::machine_ticks().unwrap_or((0, 0));
                let machine_cpu_percent = (machine.0.saturating_sub(prev_machine.0)) as f64
                    / (machine.1.saturating_sub(prev_machine.1)).max(1) as f64
                    * 100.0;
                prev_machine = machine;
                let sample = Sample {
                    t: started.elapsed().as_secs_f64(),
                    phase: p.lock().unwrap().clone(),
                    open: s.open,
                    handshakes: s.handshakes,
                    failures: s.failures,
                    drops: s.drops,
                    delivered: s.delivered,
                    published: pubs.as_ref().map_or(0, |p| p.notifications()),
                    herald_rss_kib: cpu.rss_kib,
                    herald_cpu_percent: herald.cpu_percent(&prev_cpu, &cpu),
                    clients_rss_kib: s.rss_kib,
                    loadgen_cpu_percent,
                    machine_cpu_percent,
                };
                prev_cpu = cpu;
                eprintln!("{}", line(scenario, &sample, prev.as_ref(), !herald.is_empty()));
                tl.lock().unwrap().push(sample.clone());
                prev = Some(sample);
            }
        });
        Progress { phase, timeline, task }
    }

    pub fn phase(&self, phase: &str) {
        *self.phase.lock().unwrap() = phase.to_string();
    }

    pub fn timeline(&self) -> Vec<Sample> {
        self.timeline.lock().unwrap().clone()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The mean of `f` over the samples of `phase`.
pub fn mean_over(timeline: &[Sample], phase: &str, f: impl Fn(&Sample) -> f64) -> f64 {
    let values: Vec<f64> = timeline.iter().filter(|s| s.phase == phase).map(f).collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn line(scenario: &str, s: &Sample, prev: Option<&Sample>, server: bool) -> String {
    let rate = |now: u64, before: fn(&Sample) -> u64| {
        prev.map_or(0.0, |p| (now.saturating_sub(before(p))) as f64 / (s.t - p.t).max(1e-3))
    };
    let mut out = format!(
        "[{scenario} {:>4.0}s {}] open {} | handshakes {} ({:.0}/s) failed {} drops {} | delivered {} ({:.0}/s)",
        s.t,
        s.phase,
        thousands(s.open),
        thousands(s.handshakes),
        rate(s.handshakes, |p| p.handshakes),
        s.failures,
        s.drops,
        thousands(s.delivered),
        rate(s.delivered, |p| p.delivered),
    );
    if s.published > 0 {
        out += &format!(" | published {} ({:.0}/s)", thousands(s.published), rate(s.published, |p| p.published));
    }
    if server {
        out += &format!(" | herald rss {} MiB cpu {:.0}%", s.herald_rss_kib / 1024, s.herald_cpu_percent);
    }
    out += &format!(" | loadgen rss {} MiB cpu {:.0}%", s.clients_rss_kib / 1024, s.loadgen_cpu_percent);
    out += &format!(" | machine {:.0}% busy", s.machine_cpu_percent);
    out
}
