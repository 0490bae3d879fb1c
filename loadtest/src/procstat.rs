//! Resident memory and CPU time of processes, from `/proc` (Linux).

use std::time::Instant;

use serde::Serialize;

/// `VmRSS` of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn self_rss_kib() -> u64 {
    rss_kib("self").unwrap_or(0)
}

/// User plus system CPU time in clock ticks, from `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The whole machine's (busy, total) CPU ticks, from the first line of `/proc/stat`.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every common Linux).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(ticks_from_getconf)
}

fn ticks_from_getconf() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The herald processes under test (`--herald-pid`).
#[derive(Clone)]
pub struct Herald {
    pids: Vec<u32>,
    ticks_per_sec: f64,
}

/// One reading of every herald process, summed.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub rss_kib: u64,
    pub cpu_ticks: u64,
    /// Processes that could be read.
    pub alive: usize,
}

/// What a run reports about the server processes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ServerUsage {
    pub pids: Vec<u32>,
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    /// CPU over the measured phase, percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
}

impl Herald {
    pub fn new(pids: Vec<u32>) -> Herald {
        Herald { pids, ticks_per_sec: clock_ticks() }
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    pub fn sample(&self) -> Sample {
        let mut s = Sample { at: Instant::now(), rss_kib: 0, cpu_ticks: 0, alive: 0 };
        for pid in &self.pids {
            let pid = pid.to_string();
            if let (Some(rss), Some(cpu)) = (rss_kib(&pid), cpu_ticks(&pid)) {
                s.rss_kib += rss;
                s.cpu_ticks += cpu;
                s.alive += 1;
            }
        }
        s
    }

    /// CPU between two samples, percent of one core.
    pub fn cpu_percent(&self, from: &Sample, to: &Sample) -> f64 {
        let secs = to.at.duration_since(from.at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (to.cpu_ticks.saturating_sub(from.cpu_ticks)) as f64 / self.ticks_per_sec / secs * 100.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        assert!(super::self_rss_kib() > 0);
        assert!(super::cpu_ticks("self").is_some());
    }
}
