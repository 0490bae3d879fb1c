//! The nodes' own counters, read from their `/metrics` at the start and the
//! end of a measured phase: how the store grouped the phase's publishes
//! into commits (`herald_store_group_commit_*`, docs/operations.md).

use std::time::Duration;

use serde::Serialize;

/// The group-commit counters of every node, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    commits: f64,
    notifications: f64,
    commit_seconds: f64,
    failed: f64,
}

/// What a phase's commits were, from two [`Totals`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupCommits {
    /// Groups committed (each one transaction and one WAL flush).
    pub commits: u64,
    pub notifications: u64,
    /// Notifications per commit.
    pub per_commit: f64,
    /// A committed group's transaction alone, on average (the queue
    /// before it not included).
    pub mean_commit_ms: f64,
    pub failed: u64,
}

const COMMITS: &str = "herald_store_group_commit_size_count";
const NOTIFICATIONS: &str = "herald_store_group_commit_size_sum";
const COMMIT_SECONDS: &str = "herald_store_group_commit_seconds_sum";
const FAILED: &str = "herald_store_group_commits_failed_total";

impl Totals {
    /// Every node's counters; `None` if any node did not answer with them
    /// (an older build, or a node down), so a phase is never half-counted.
    pub async fn read(http_urls: &[String]) -> Option<Totals> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
        let mut sum = Totals::default();
        for url in http_urls {
            let text = client.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
            let node = Totals::parse(&text)?;
            sum.commits += node.commits;
            sum.notifications += node.notifications;
            sum.commit_seconds += node.commit_seconds;
            sum.failed += node.failed;
        }
        Some(sum)
    }

    /// The counters in one node's Prometheus text.
    fn parse(text: &str) -> Option<Totals> {
        let value =
            |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
        Some(Totals {
            commits: value(COMMITS)?,
            notifications: value(NOTIFICATIONS)?,
            commit_seconds: value(COMMIT_SECONDS)?,
            failed: value(FAILED)?,
        })
    }

    /// The commits from `before` (read at the start of a phase) to now;
    /// `None` when either reading is missing.
    pub async fn phase_since(before: Option<&Totals>, http_urls: &[String]) -> Option<GroupCommits> {
        let before = before?;
        Some(Totals::read(http_urls).await?.since(before))
    }

    /// The commits between `before` and these totals.
    pub fn since(&self, before: &Totals) -> GroupCommits {
        let commits = (self.commits - before.commits).max(0.0);
        let notifications = (self.notifications - before.notifications).max(0.0);
        let seconds = (self.commit_seconds - before.commit_seconds).max(0.0);
        let per = |x: f64| if commits > 0.0 { x / commits } else { 0.0 };
        GroupCommits {
            commits: commits as u64,
            notifications: notifications as u64,
            per_commit: per(notifications),
            mean_commit_ms: per(seconds) * 1e3,
            failed: (self.failed - before.failed).max(0.0) as u64,
        }
    }
}

impl GroupCommits {
    /// A line for a summary.
    pub fn markdown(&self, phase: &str) -> String {
        if self.commits == 0 && self.failed == 0 {
            return format!("Group commits {phase}: none.\n\n");
        }
        format!(
            "Group commits {phase} (the nodes' `herald_store_group_commit_*`): {} commits of {} notifications, \
             **{:.1} per commit**, {:.2} ms per commit on average; {} failed.\n\n",
            self.commits, self.notifications, self.per_commit, self.mean_commit_ms, self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_counters_and_takes_the_difference() {
        let at = |commits, notifications, seconds| {
            format!(
                "# HELP x\nherald_store_group_commit_size_bucket{{le=\"1.0\"}} 3\n\
                 {COMMITS} {commits}\n{NOTIFICATIONS} {notifications}\n{COMMIT_SECONDS} {seconds}\n\
                 herald_store_group_commits_failed_total_created 1.7e9\n{FAILED} 1\n"
            )
        };
        let before = Totals::parse(&at(10, 40, 0.02)).unwrap();
        assert_eq!(before, Totals { commits: 10.0, notifications: 40.0, commit_seconds: 0.02, failed: 1.0 });
        let after = Totals::parse(&at(30, 1040, 0.06)).unwrap();
        let phase = after.since(&before);
        assert_eq!((phase.commits, phase.notifications, phase.failed), (20, 1000, 0));
        assert!((phase.per_commit - 50.0).abs() < 1e-9);
        assert!((phase.mean_commit_ms - 2.0).abs() < 1e-9);
        assert_eq!(Totals::default().since(&Totals::default()).per_commit, 0.0);
        assert_eq!(Totals::parse("herald_sessions_active 3\n"), None, "a build without the counters");
    }
}
