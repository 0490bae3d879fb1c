//! `crash`: a crash-consistency soak. Herald is started here (the binary at
//! `--herald-bin`), loaded with batched publishes, killed with SIGKILL at a
//! random moment, and restarted on the same store, round after round. After
//! every restart:
//!
//! - every publish acknowledged before the kill is stored, under the id it
//!   was acknowledged with (guarantee 1 of the spec: durable before
//!   acknowledged);
//! - every user's seqs run without a gap up to their counter (guarantee 2),
//!   checked from where the previous round's check ended;
//! - `herald check` passes (SQLite's integrity check; no notification beyond
//!   its counter);
//!
//! and the time from the restart to the node listening again is recorded
//! (crash recovery). Any fault ends the run with exit code 1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald_client::{PublishRequest, Publisher};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::report::{self, Run};

pub struct Args {
    pub herald_bin: PathBuf,
    /// `None`: a SQLite store in the run's folder.
    pub database_url: Option<String>,
    pub herald_env: Vec<(String, String)>,
    pub rounds: usize,
    pub until: Option<Duration>,
    pub kill_after: (Duration, Duration),
    pub users: usize,
    pub batch: usize,
    pub publishers: usize,
    pub out: Option<PathBuf>,
}

/// One round: run, kill, restart, verify.
#[derive(Debug, Clone, Serialize)]
struct Round {
    round: usize,
    /// Notifications acknowledged before the kill.
    acknowledged: u64,
    /// Publishes answered with an error while the node was up (not counted as acknowledged).
    errors_before_kill: u64,
    killed_after_s: f64,
    /// Restart → listening, after the kill.
    recovery_s: f64,
    /// Notifications whose seqs were read back and checked after the restart.
    verified: u64,
}

#[derive(Debug, Serialize)]
struct Outcome {
    herald_bin: String,
    database: String,
    users: usize,
    batch: usize,
    publishers: usize,
    rounds: Vec<Round>,
    acknowledged: u64,
    /// The sum of the users' counters: every notification ever stored for them
    /// (acknowledged, or in flight at a kill and committed), retention or not.
    stored_in_all: i64,
    passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<String>,
}

/// What the publishers got back in one round: (user, seq, id).
type Acks = Vec<(u32, i64, String)>;

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let run = Run::create("crash", args.out.clone())?;
    let database =
        args.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", run.dir.join("herald.db").display()));
    let node = Node::new(&args, &run.dir, &database);
    let prefix = format!("crash{:08x}", rand::random::<u32>());
    eprintln!(
        "crash: {} rounds{}, {} users, {} per publish, {} publishers; results in {}",
        args.rounds,
        args.until.map(|u| format!(" (or {})", humantime::format_duration(u))).unwrap_or_default(),
        args.users,
        args.batch,
        args.publishers,
        run.dir.display()
    );
    let mut outcome = Outcome {
        herald_bin: args.herald_bin.display().to_string(),
        database: report::redact_url(&database),
        users: args.users,
        batch: args.batch,
        publishers: args.publishers,
        rounds: Vec::new(),
        acknowledged: 0,
        stored_in_all: 0,
        passed: false,
        fault: None,
    };
    let soak = soak(&args, &node, &prefix, &mut outcome).await;
    if let Err(e) = &soak {
        outcome.fault = Some(format!("{e:#}"));
    }
    outcome.passed = soak.is_ok();
    run.write_json(&outcome)?;
    run.write_file("summary.md", &summary(&run, &outcome))?;
    report::announce(&run.dir);
    match soak {
        Ok(()) => {
            eprintln!(
                "passed: {} rounds, {} notifications acknowledged, none lost",
                outcome.rounds.len(),
                outcome.acknowledged
            );
            Ok(0)
        }
        Err(e) => {
            eprintln!("FAILED: {e:#}");
            Ok(1)
        }
    }
}

async fn soak(args: &Args, node: &Node, prefix: &str, outcome: &mut Outcome) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    // Per user: the seq up to which their history has been checked gapless.
    let mut checked: HashMap<u32, i64> = HashMap::new();
    let (mut up, _) = node.start(0).await?;
    let mut previous: Acks = Vec::new();
    for round in 1..=args.rounds {
        if args.until.is_some_and(|u| started.elapsed() >= u) {
            break;
        }
        let state = Arc::new(RoundState::default());
        let tasks: Vec<_> = (0..args.publishers.max(1))
            .map(|task| {
                let load = Load {
                    publisher: up.publisher(),
                    state: state.clone(),
                    users: args.users,
                    batch: args.batch.clamp(1, args.users),
                    prefix: prefix.to_string(),
                    task,
                };
                tokio::spawn(load.run(rng.random::<u64>()))
            })
            .collect();
        let (low, high) = args.kill_after;
        let wait = low + (high.saturating_sub(low)).mul_f64(rng.random::<f64>());
        tokio::time::sleep(wait).await;
        let errors_before_kill = state.errors.load(Ordering::Relaxed);
        state.killed.store(true, Ordering::Relaxed);
        up.kill().await?;
        for task in tasks {
            let _ = task.await;
        }
        let acks = std::mem::take(&mut *state.acks.lock().unwrap());

        let (restarted, recovery) = node.start(round).await?;
        up = restarted;
        let publisher = up.publisher();
        // This round's acknowledgements, and the previous round's once more:
        // a later crash must not lose what an earlier one kept.
        let mut verified = 0;
        for set in [&previous, &acks] {
            verified +=
                verify(&publisher, prefix, set, &mut checked).await.with_context(|| format!("round {round}"))?;
        }
        node.check().await.with_context(|| format!("round {round}: herald check"))?;
        let done = Round {
            round,
            acknowledged: acks.len() as u64,
            errors_before_kill,
            killed_after_s: wait.as_secs_f64(),
            recovery_s: recovery.as_secs_f64(),
            verified,
        };
        eprintln!(
            "[crash round {round}] killed after {:.1} s with {} acknowledged ({} errors before) | restarted in {:.2} s | {} checked, no loss, no gap | herald check ok",
            done.killed_after_s, done.acknowledged, done.errors_before_kill, done.recovery_s, done.verified
        );
        outcome.acknowledged += done.acknowledged;
        outcome.rounds.push(done);
        previous = acks;
    }
    let publisher = up.publisher();
    let mut stored = 0;
    for (&j, _) in checked.iter() {
        stored += publisher.history(&format!("{prefix}-{j}"), 0, 1).await?.last_seq;
    }
    outcome.stored_in_all = stored;
    up.stop().await?;
    node.check().await.context("after the last round: herald check")?;
    Ok(())
}

/// What a round's publishers share.
#[derive(Default)]
struct RoundState {
    acks: Mutex<Acks>,
    /// Publishes that failed while the node was up.
    errors: AtomicU64,
    killed: AtomicBool,
}

/// One publisher: batched publishes to random users, as fast as they are
/// answered, until the node is killed.
struct Load {
    publisher: Publisher,
    state: Arc<RoundState>,
    users: usize,
    batch: usize,
    prefix: String,
    task: usize,
}

impl Load {
    async fn run(self, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for i in 0.. {
            let chosen: Vec<u32> =
                rand::seq::index::sample(&mut rng, self.users, self.batch).into_iter().map(|j| j as u32).collect();
            let mut names: Vec<String> = chosen.iter().map(|j| format!("{}-{j}", self.prefix)).collect();
            let (user_id, user_ids) = match names.len() {
                1 => (names.pop(), None),
                _ => (None, Some(names)),
            };
            // Now and then a payload of a few pages, so commits span many WAL frames.
            let pad = if (i + self.task).is_multiple_of(7) { 6000 } else { 40 };
            let payload = serde_json::json!({"task": self.task, "i": i, "pad": "x".repeat(pad)});
            let request = PublishRequest {
                user_id,
                user_ids,
                topic: "crash".into(),
                payload,
                idempotency_key: None,
                digest: None,
            };
            match self.publisher.publish(&request).await {
                Ok((_, answer)) if answer.notifications.len() == chosen.len() => {
                    let mut acks = self.state.acks.lock().unwrap();
                    acks.extend(chosen.iter().zip(answer.notifications).map(|(j, n)| (*j, n.seq, n.id)));
                }
                _ if self.state.killed.load(Ordering::Relaxed) => return,
                _ => {
                    self.state.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Checks `acks` against the store and extends each acknowledged user's
/// gapless prefix in `checked`; the number of seqs read back.
async fn verify(
    publisher: &Publisher,
    prefix: &str,
    acks: &Acks,
    checked: &mut HashMap<u32, i64>,
) -> anyhow::Result<u64> {
    let mut by_user: HashMap<u32, HashMap<i64, &str>> = HashMap::new();
    for (j, seq, id) in acks {
        by_user.entry(*j).or_default().insert(*seq, id);
    }
    let mut read = 0;
    for (j, mine) in by_user {
        let user = format!("{prefix}-{j}");
        // From the lowest acknowledged seq (or where the last check ended,
        // if lower) to the head, page by page.
        let from = checked.get(&j).copied().unwrap_or(0).min(mine.keys().min().copied().unwrap_or(1) - 1);
        let (mut stored, mut after, mut head) = (Vec::new(), from, 0);
        loop {
            let page = publisher.history(&user, after, 500).await.with_context(|| format!("reading {user}"))?;
            head = head.max(page.last_seq);
            let Some(last) = page.notifications.last() else { break };
            after = last.seq;
            stored.extend(page.notifications.into_iter().map(|n| (n.seq, n.id)));
        }
        read += stored.len() as u64;
        let end = judge(from, &stored, head, &mine).map_err(|fault| anyhow::anyhow!("{user}: {fault}"))?;
        checked.insert(j, end);
    }
    Ok(read)
}

/// One user's history read back after `from`, oldest first, against the
/// head's counter and what was acknowledged (`seq → id`): every seq from
/// `from + 1` to `head` once, in order, and every acknowledged seq among
/// them under its id. The seq checked up to (`head`), or the fault.
fn judge(from: i64, stored: &[(i64, String)], head: i64, acknowledged: &HashMap<i64, &str>) -> Result<i64, String> {
    let mut expect = from + 1;
    for (seq, id) in stored {
        if *seq != expect {
            return Err(format!("seq {expect} is missing (found {seq} next; the counter is at {head})"));
        }
        if let Some(acked) = acknowledged.get(seq) {
            if acked != id {
                return Err(format!("seq {seq} was acknowledged as {acked}, stored as {id}"));
            }
        }
        expect += 1;
    }
    if expect - 1 != head {
        return Err(format!("the history ends at {}, the counter says {head}", expect - 1));
    }
    if let Some(lost) = acknowledged.keys().filter(|&&seq| seq > head).min() {
        return Err(format!("seq {lost} was acknowledged and is not stored (the counter is at {head})"));
    }
    Ok(head)
}

/// How to start the node, the same way every round.
struct Node {
    bin: PathBuf,
    database: String,
    env: Vec<(String, String)>,
    api_key: String,
    logs: PathBuf,
}

impl Node {
    fn new(args: &Args, dir: &Path, database: &str) -> Node {
        Node {
            bin: args.herald_bin.clone(),
            database: database.into(),
            env: args.herald_env.clone(),
            api_key: format!("crash-{:016x}", rand::random::<u64>()),
            logs: dir.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env("HERALD_DATABASE_URL", &self.database)
            .env("HERALD_API_KEYS", &self.api_key)
            .env("HERALD_JWT_SECRET", format!("crash-secret-{:016x}", rand::random::<u64>()))
            .env("HERALD_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the node (round `round`'s log file) and waits until it listens.
    async fn start(&self, round: usize) -> anyhow::Result<(Up, Duration)> {
        let log = self.logs.join(format!("herald-{round}.log"));
        let started = Instant::now();
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find(|l| l.contains("listening")).and_then(|l| l.split("addr=").nth(1)) {
                let addr = addr.split_whitespace().next().unwrap_or_default().trim_matches('"').to_string();
                let up = Up { child, url: format!("http://{addr}"), api_key: self.api_key.clone() };
                return Ok((up, started.elapsed()));
            }
            if let Some(status) = child.try_wait()? {
                bail!("herald exited with {status} before listening; see {}", log.display());
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("herald did not listen within 120 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `herald check` on the store.
    async fn check(&self) -> anyhow::Result<()> {
        let out = self.command().arg("check").output().await?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// A running node.
struct Up {
    child: Child,
    url: String,
    api_key: String,
}

impl Up {
    fn publisher(&self) -> Publisher {
        Publisher::new(self.url.clone(), self.api_key.clone())
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, and a clean exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("herald already exited")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
        let status = self.child.wait().await?;
        if !status.success() {
            bail!("herald exited with {status} after SIGTERM");
        }
        Ok(())
    }
}

fn summary(run: &Run, o: &Outcome) -> String {
    let mut s = run.header(None);
    s += &format!(
        "Herald (`{}`) on `{}`: {} users, {} per publish, {} publishers; killed with SIGKILL at a random moment \
         each round, restarted on the same store, then checked.\n\n",
        o.herald_bin, o.database, o.users, o.batch, o.publishers
    );
    s += "| round | acknowledged | errors before the kill | killed after s | restarted in s | seqs read back |\n|---|---|---|---|---|---|\n";
    for r in &o.rounds {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.2} | {} |\n",
            r.round, r.acknowledged, r.errors_before_kill, r.killed_after_s, r.recovery_s, r.verified
        );
    }
    s += &format!(
        "\n**{}** — {} rounds, {} notifications acknowledged, {} stored in all (the users' counters).\n",
        if o.passed {
            "Passed: every acknowledged notification stored under its id, no gap, `herald check` ok after every restart"
        } else {
            "FAILED"
        },
        o.rounds.len(),
        o.acknowledged,
        o.stored_in_all
    );
    if let Some(f) = &o.fault {
        s += &format!("\nFault: {f}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::judge;

    fn stored(seqs: &[i64]) -> Vec<(i64, String)> {
        seqs.iter().map(|s| (*s, format!("id{s}"))).collect()
    }

    #[test]
    fn a_gapless_history_holding_every_acknowledged_id_passes() {
        let acked = HashMap::from([(4, "id4"), (6, "id6")]);
        assert_eq!(judge(3, &stored(&[4, 5, 6, 7]), 7, &acked), Ok(7));
        assert_eq!(judge(7, &[], 7, &HashMap::new()), Ok(7), "nothing new");
    }

    #[test]
    fn every_kind_of_loss_is_named() {
        let acked = HashMap::from([(4, "id4"), (6, "id6")]);
        let gap = judge(3, &stored(&[4, 6, 7]), 7, &acked).unwrap_err();
        assert!(gap.contains("seq 5 is missing"), "{gap}");
        let swapped = judge(3, &stored(&[4, 5, 6]), 6, &HashMap::from([(6, "other")])).unwrap_err();
        assert!(swapped.contains("acknowledged as other, stored as id6"), "{swapped}");
        let short = judge(3, &stored(&[4, 5]), 7, &acked).unwrap_err();
        assert!(short.contains("ends at 5, the counter says 7"), "{short}");
        let lost = judge(3, &stored(&[4, 5]), 5, &acked).unwrap_err();
        assert!(lost.contains("seq 6 was acknowledged and is not stored"), "{lost}");
    }
}
