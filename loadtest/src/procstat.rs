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

/// Bytes a process caused to be written to storage (`write_bytes` of
/// `/proc/<pid>/io`: the store's WAL, checkpoints and files; readable by
/// the process's owner).
pub fn write_bytes(pid: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
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
    /// CPU of every program on the machine over the same phase (herald,
    /// the store, the broker, this tool), most first; under 0.05 CPU-seconds
    /// left out.
    pub cpu_by_program: Vec<ProgramCpu>,
    /// How the nodes grouped the phase's notifications into commits, from
    /// their `/metrics`; `None` when a node did not report it.
    pub group_commits: Option<crate::scrape::GroupCommits>,
    /// What the herald processes wrote to storage over the phase; `None`
    /// when one could not be read.
    pub disk_written_bytes: Option<u64>,
}

/// The start of a measured phase: the herald processes and every program on
/// the machine, read at the same moment.
pub struct PhaseStart {
    pub herald: Sample,
    pub programs: ByProgram,
    pub commits: Option<crate::scrape::Totals>,
    pub written: Option<u64>,
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

    /// Bytes all the herald processes wrote to storage so far; `None`
    /// without processes or when one cannot be read.
    pub fn written(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|pid| write_bytes(&pid.to_string())).sum()
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

/// CPU ticks of every process on the machine, summed by command name
/// (`/proc/<pid>/comm`: `herald`, `postgres`, `redis-server`,
/// `herald-loadtest`, …), at one moment.
///
/// Two of them give what each program cost over a phase, the store and the
/// broker included: on a shared box that is what the wall time is made of,
/// and each program's CPU divided by the load generator's (whose work a
/// scenario fixes) compares runs on a box whose speed varies
/// (docs/BENCHMARKS.md, "The PostgreSQL replay, leaner"). A process that
/// ends between the two is left out; one that starts counts from zero; one
/// that renames itself is counted under its later name; the kernel's
/// workers (named after their current work queue) count as one, `kworker`.
pub struct ByProgram {
    ticks: std::collections::HashMap<u32, (String, u64)>,
}

/// One program's CPU over a phase.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProgramCpu {
    pub program: String,
    pub cpu_seconds: f64,
    /// `cpu_seconds` over the load generator's (`herald-loadtest`), when it used any.
    pub per_load_generator_second: Option<f64>,
}

impl ByProgram {
    pub fn snapshot() -> ByProgram {
        let mut ticks = std::collections::HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return ByProgram { ticks } };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let (Ok(comm), Some(cpu)) =
                (std::fs::read_to_string(format!("/proc/{pid}/comm")), cpu_ticks(&pid.to_string()))
            else {
                continue;
            };
            ticks.insert(pid, (comm.trim_end().to_string(), cpu));
        }
        ByProgram { ticks }
    }

    /// Each program's CPU since `earlier`, most first; programs under `floor` seconds are left out.
    pub fn since(&self, earlier: &ByProgram, floor: f64) -> Vec<ProgramCpu> {
        let mut by_name: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (pid, (name, now)) in &self.ticks {
            let then = earlier.ticks.get(pid).map_or(0, |(_, then)| *then);
            *by_name.entry(program_of(name)).or_default() += now.saturating_sub(then);
        }
        let seconds = |ticks: u64| ticks as f64 / clock_ticks();
        let load_generator = by_name.get("herald-loadtest").map(|&t| seconds(t)).filter(|&s| s > 0.0);
        let mut found: Vec<ProgramCpu> = by_name
            .into_iter()
            .map(|(name, ticks)| ProgramCpu {
                program: name.to_string(),
                cpu_seconds: seconds(ticks),
                per_load_generator_second: load_generator.map(|l| seconds(ticks) / l),
            })
            .filter(|p| p.cpu_seconds >= floor)
            .collect();
        found.sort_by(|a, b| b.cpu_seconds.total_cmp(&a.cpu_seconds).then_with(|| a.program.cmp(&b.program)));
        found
    }
}

/// The program a command name counts under: the kernel's workers
/// (`kworker/u8:2-ext4-rsv-conversion`, named after their current work
/// queue) all count as `kworker`.
fn program_of(comm: &str) -> &str {
    if comm.starts_with("kworker/") {
        "kworker"
    } else {
        comm
    }
}

/// The summary's lines on the server over `phase`: every program's CPU,
/// the store's group commits, and what herald wrote to storage.
pub fn server_tables(phase: &str, server: &ServerUsage) -> String {
    let commits = server.group_commits.as_ref().map_or(String::new(), |c| c.markdown(phase));
    let written = server.disk_written_bytes.map_or(String::new(), |bytes| {
        let per = match server.group_commits.as_ref().map(|c| c.notifications) {
            Some(n) if n > 0 => format!(", {:.1} KB per notification committed", bytes as f64 / n as f64 / 1e3),
            _ => String::new(),
        };
        format!("Herald wrote {:.1} MB to storage {phase}{per}.\n\n", bytes as f64 / 1e6)
    });
    programs_table(phase, &server.cpu_by_program) + &commits + &written
}

/// The Markdown table of [`ByProgram::since`] for a phase.
fn programs_table(phase: &str, programs: &[ProgramCpu]) -> String {
    if programs.is_empty() {
        return String::new();
    }
    let mut md = format!("| CPU {phase}, by program | CPU-seconds | ÷ the load generator's |\n|---|---|---|\n");
    for p in programs {
        let ratio = p.per_load_generator_second.map_or("–".to_string(), |r| format!("{r:.2}"));
        md += &format!("| `{}` | {:.2} | {} |\n", p.program, p.cpu_seconds, ratio);
    }
    md + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(super::self_rss_kib() > 0);
        assert!(super::cpu_ticks("self").is_some());
        assert!(super::write_bytes("self").is_some());
    }

    #[test]
    fn programs_are_summed_by_name_and_set_against_the_load_generator() {
        let at = |pairs: &[(u32, &str, u64)]| ByProgram {
            ticks: pairs.iter().map(|&(pid, name, t)| (pid, (name.to_string(), t))).collect(),
        };
        let ticks = clock_ticks() as u64;
        let before = at(&[
            (1, "herald", 0),
            (2, "postgres", 10 * ticks),
            (4, "herald-loadtest", 0),
            (9, "idle", 5),
            (12, "kworker/u8:2-events", 100 * ticks),
            (13, "kworker/1:1H-kblockd", 0),
        ]);
        // pid 3 is a PostgreSQL backend that started meanwhile; pid 2 used
        // 1 s; the kernel's workers (pid 12 renamed itself) used half a second.
        let after = at(&[
            (1, "herald", 4 * ticks),
            (2, "postgres", 11 * ticks),
            (3, "postgres", 2 * ticks),
            (4, "herald-loadtest", 2 * ticks),
            (9, "idle", 5),
            (12, "kworker/u8:2-flush", 100 * ticks + ticks / 4),
            (13, "kworker/1:1H-kblockd", ticks / 4),
        ]);
        let found = after.since(&before, 0.05);
        let row = |program: &str, cpu_seconds: f64, ratio: f64| ProgramCpu {
            program: program.into(),
            cpu_seconds,
            per_load_generator_second: Some(ratio),
        };
        assert_eq!(
            found,
            vec![
                row("herald", 4.0, 2.0),
                row("postgres", 3.0, 1.5),
                row("herald-loadtest", 2.0, 1.0),
                row("kworker", 0.5, 0.25)
            ]
        );
        assert!(programs_table("in the storm", &found).contains("| `postgres` | 3.00 | 1.50 |"));
        // A real snapshot finds this very process.
        let now = ByProgram::snapshot();
        assert!(now.ticks.contains_key(&std::process::id()));
    }
}
