//! Where a run's results go: `<out>/result.json`, `<out>/summary.md` and
//! charts, with the targets it was measured against.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

/// One run's output folder and identity.
pub struct Run {
    pub scenario: &'static str,
    pub dir: PathBuf,
    pub started_at: String,
    pub command: String,
    pub commit: Option<String>,
}

impl Run {
    /// Creates `out`, or `target/loadtest/<scenario>-<UTC timestamp>`.
    pub fn create(scenario: &'static str, out: Option<PathBuf>) -> anyhow::Result<Run> {
        let now = time::OffsetDateTime::now_utc();
        let stamp = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            now.month() as u8,
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let dir = out.unwrap_or_else(|| PathBuf::from("target/loadtest").join(format!("{scenario}-{stamp}")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let started_at = now.format(&time::format_description::well_known::Rfc3339).unwrap_or(stamp);
        let mut hide_next = false;
        let command = std::env::args()
            .map(|a| {
                let shown = if hide_next { "…".to_string() } else { redact(&a) };
                hide_next = a == "--jwt-secret" || a == "--api-key";
                shown
            })
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Run { scenario, dir, started_at, command, commit: commit() })
    }

    pub fn write_json(&self, result: &impl Serialize) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("result.json");
        std::fs::write(&path, serde_json::to_vec_pretty(result)?)?;
        Ok(path)
    }

    pub fn write_file(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The summary's first lines: what ran, when, on what.
    pub fn header(&self, label: Option<&str>) -> String {
        let mut s = format!("# herald-loadtest {}\n\n", self.scenario);
        s += &format!("- started: {}\n", self.started_at);
        if let Some(c) = &self.commit {
            s += &format!("- commit: `{c}`\n");
        }
        if let Some(l) = label {
            s += &format!("- label: {l}\n");
        }
        s += &format!("- command: `{}`\n\n", self.command);
        s
    }
}

/// The commit of the working directory, when it is a git checkout.
fn commit() -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Secrets stay out of the recorded command line (a URL's password too,
/// e.g. `--database-url`'s).
fn redact(arg: &str) -> String {
    for flag in ["--jwt-secret=", "--api-key="] {
        if arg.starts_with(flag) {
            return format!("{flag}…");
        }
    }
    redact_url(arg)
}

/// A URL without its password (anything else as it is).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:…{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Whether a run met a target.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    NotMet,
    /// The run was not of the size or kind the target is about.
    NotApplicable,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Target {
    pub fn new(name: &str, goal: &str, measured: String, met: bool) -> Target {
        let verdict = if met { Verdict::Met } else { Verdict::NotMet };
        Target { name: name.into(), goal: goal.into(), measured, verdict, note: None }
    }

    /// Judged only when `applies`; otherwise recorded with `why_not`.
    pub fn when(mut self, applies: bool, why_not: &str) -> Target {
        if !applies {
            self.verdict = Verdict::NotApplicable;
            self.note = Some(why_not.into());
        }
        self
    }
}

/// The Markdown table of targets.
pub fn targets_table(targets: &[Target]) -> String {
    let mut s = String::from("## Targets\n\n| target | goal | measured | verdict |\n|---|---|---|---|\n");
    for t in targets {
        let verdict = match t.verdict {
            Verdict::Met => "**met**".to_string(),
            Verdict::NotMet => "**not met**".to_string(),
            Verdict::NotApplicable => format!("n/a: {}", t.note.as_deref().unwrap_or("")),
        };
        s += &format!("| {} | {} | {} | {} |\n", t.name, t.goal, t.measured, verdict);
    }
    s.push('\n');
    s
}

/// Prints where the results are.
pub fn announce(dir: &Path) {
    eprintln!("results: {}", dir.display());
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_stay_out_of_the_results() {
        assert_eq!(super::redact_url("postgres://u:secret@127.0.0.1/db"), "postgres://u:…@127.0.0.1/db");
        assert_eq!(super::redact_url("postgres://u@127.0.0.1/db"), "postgres://u@127.0.0.1/db");
        assert_eq!(super::redact_url("sqlite:///tmp/h.db"), "sqlite:///tmp/h.db");
        assert_eq!(super::redact("--database-url=postgres://u:secret@h/db"), "--database-url=postgres://u:…@h/db");
    }
}
